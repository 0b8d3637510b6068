"""The Pangu Pro MoE decoder language model (docs/design.md section 5), single-device, at any size.

Shape legend
    B  batch        S  new positions in this call     P  cached positions     L = P + S (or a static
    H  hidden size  V  vocabulary                     h  query heads           cache's slots)
    D  head dim     g  key/value heads

Pre-RMSNorm decoder layers: grouped-query attention with biases on q, k, v and o, rotate-half RoPE
(:mod:`moge.model.attention`),
PyTorch SDPA; the MoGE layer (or a dense SwiGLU for ``mlp_only_layers``) as the MLP; final RMSNorm;
an untied output head. Module names equal the published checkpoint's tensor names, except that the
routed experts are stacked (``mlp.experts.gate_up_proj [N,2F,H]``, ``mlp.experts.down_proj [N,H,F]``).
Expert parallelism lives in :mod:`moge.parallel` and wraps this code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import validate as V
from ..config import MoGEConfig
from ..experts import KernelChoices, Linear, use_kernels
from .attention import RotaryEmbedding
from .blocks import DecoderLayer, RMSNorm, build_attention_mask, causal_lm_loss, positions_from_padding
from .cache import CacheError, DynamicKVCache
from .moe import MoGELayer, RouterStats
from .mtp import make_predictors, mtp_losses


# The growing cache lives with the static one in moge.model.cache; the old name stays importable here.
KVCache = DynamicKVCache


@dataclass
class ModelOutput:
    """What :class:`MoGEForCausalLM` returns; ``loss`` is the LM loss only, ``aux_loss`` the routers' sum
    (MTP predictors' routers included); ``mtp`` holds each predictor's loss and accuracy when training
    a model with MTP predictors on labels (:mod:`moge.model.mtp`)."""
    logits: Tensor | None
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    router_stats: list[RouterStats | None] = field(default_factory=list)
    past_key_values: KVCache | None = None
    hidden_states: Tensor | None = None
    mtp: list = field(default_factory=list)


class Backbone:
    """Embedding, decoder layers, the final norm and the RoPE table (no output head): built by
    :meth:`init_backbone`, run by :meth:`backbone_forward`.

    A mixin for ``nn.Module`` classes, so that :class:`MoGEModel` and the transformers base model
    (:class:`moge.hf.PanguProMoEModel`, a ``PreTrainedModel`` whose own ``forward`` speaks transformers'
    signature) are the same backbone with the same parameter names: whoever needs the backbone's
    ``(hidden, router stats)`` form (the engine, the transformers heads) calls :meth:`backbone_forward`
    on either.
    """

    def init_backbone(self, config: MoGEConfig, layer_class: type[DecoderLayer] = DecoderLayer) -> None:
        """Create the submodules (call once, after ``nn.Module.__init__``). ``layer_class``: a
        :class:`DecoderLayer` subclass the transformers wrapper passes (transformers' checkpointing
        layer); a layer with its own ``gradient_checkpointing`` flag checkpoints itself."""
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.resolved_head_dim, config.rope_theta)
        # This model's measured CPU kernel choices (moge.experts.choice): owned here, not by the process.
        self.kernels = KernelChoices()
        use_kernels(self, self.kernels)
        # Activation checkpointing of each decoder layer while training; transformers'
        # gradient_checkpointing_enable() sets this flag and `_gradient_checkpointing_func` (moge.hf).
        self.gradient_checkpointing = False

    def check_inputs(self, input_ids: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
                     past_key_values, inputs_embeds: Tensor | None, check_ids: bool | None = None) -> None:
        """Refuse bad inputs with a named error before any work.

        Types, dtypes and shapes are checked always (metadata only). Whether every token id is in
        ``[0, V)`` needs the ids' values: ``check_ids=None`` checks them when they are on the CPU,
        where that costs one pass over ``B*S`` integers and no device sync, and skips it on an
        accelerator, where reading them back would stall every decode step and training step (there
        :func:`moge.generate.generate` checks the prompt once at its entry); ``True`` always checks,
        ``False`` never.
        """
        vocab, hidden = self.embed_tokens.num_embeddings, self.embed_tokens.embedding_dim
        if (input_ids is None) == (inputs_embeds is None):
            raise V.InvalidArgumentError("pass exactly one of input_ids [B, S] and inputs_embeds [B, S, H], got "
                                         + ("both" if input_ids is not None else "neither"))
        if input_ids is not None:
            V.tensor("input_ids", input_ids, "int", dims=2, nonempty=True)
            # values are data: not readable while torch.export / torch.compile trace the forward
            on_cpu = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
            if check_ids or (check_ids is None and on_cpu):
                V.ids_in_range("input_ids", input_ids, vocab)
            b, s = input_ids.shape
        else:
            V.tensor("inputs_embeds", inputs_embeds, "float", dims=3, last=hidden, nonempty=True)
            b, s = inputs_embeds.shape[:2]
        past = 0
        if past_key_values is not None:
            if not (hasattr(past_key_values, "get_seq_length") and hasattr(past_key_values, "update")):
                raise V.ArgumentTypeError(f"past_key_values must be a KV cache (KVCache or transformers' "
                                          f"DynamicCache), got {type(past_key_values).__name__}")
            if getattr(past_key_values, "is_static", False):
                # The engine's form; reading the static cache's lengths would be a host sync.
                ready = attention_mask is not None and attention_mask.dim() == 4 and position_ids is not None
                if not ready:
                    raise CacheError("a StaticKVCache needs position_ids and a 4-D [B,1,S,L] attention mask; "
                                     "decode through moge.engine (prefill / DecodeStep) or moge.generate")
                if (attention_mask.dtype != torch.bool or attention_mask.shape[0] not in (1, b)
                        or attention_mask.shape[2] != s or attention_mask.shape[3] > past_key_values.slots):
                    raise V.InvalidArgumentError(
                        f"with a StaticKVCache the attention_mask must be boolean [B={b}, 1, S={s}, L <= "
                        f"{past_key_values.slots}], got {attention_mask.dtype} {tuple(attention_mask.shape)}")
                attention_mask = None  # checked; position_ids below
            else:
                past = past_key_values.get_seq_length()
        if attention_mask is not None and attention_mask.dim() == 4:  # a ready boolean mask (moge.hf builds them)
            if attention_mask.dtype != torch.bool:
                raise V.ArgumentTypeError(f"a 4-D attention_mask must be boolean (True = attend), got {attention_mask.dtype}")
            if tuple(attention_mask.shape) not in ((b, 1, s, past + s), (1, 1, s, past + s)):
                raise V.InvalidArgumentError(f"a 4-D attention_mask must be [B, 1, S, past+S] = [{b}, 1, {s}, "
                                             f"{past + s}], got {tuple(attention_mask.shape)}")
        elif attention_mask is not None:
            V.tensor("attention_mask", attention_mask, dims=2)
            if tuple(attention_mask.shape) != (b, past + s):
                raise V.InvalidArgumentError(f"attention_mask must be [B, past+S] = [{b}, {past + s}], got "
                                             f"{tuple(attention_mask.shape)}")
        if position_ids is not None:
            V.tensor("position_ids", position_ids, "int", dims=2)
            if position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
                raise V.InvalidArgumentError(f"position_ids must be [B, S] = [{b}, {s}] (or [1, S]), got "
                                             f"{tuple(position_ids.shape)}")

    def backbone_forward(self, input_ids_BS: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: Tensor | None = None, check_ids: bool | None = None,
                router_stats: bool = True) -> tuple[Tensor, list[RouterStats | None]]:
        """Final hidden states ``[B,S,H]`` and each layer's router statistics; see :meth:`check_inputs`.

        ``attention_mask`` is the 2-D ``[B, past+S]`` padding mask (1 = real token), or a ready 4-D
        boolean ``[B,1,S,L]`` mask (True = attend) used as is, which needs ``position_ids``: the form
        :mod:`moge.engine` passes with a :class:`~moge.model.cache.StaticKVCache`, so nothing here
        reads the cache's length. ``router_stats=False`` (decoding) skips the routers' statistics.
        """
        self.check_inputs(input_ids_BS, attention_mask, position_ids, past_key_values, inputs_embeds, check_ids)
        x_BSH = self.embed_tokens(input_ids_BS) if inputs_embeds is None else inputs_embeds
        b, s, _ = x_BSH.shape
        if attention_mask is not None and attention_mask.dim() == 4 and position_ids is not None:
            mask = attention_mask
        else:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            if position_ids is None:
                if attention_mask is not None and attention_mask.dim() == 2:
                    position_ids = positions_from_padding(attention_mask)[:, past:]
                else:
                    position_ids = torch.arange(past, past + s, device=x_BSH.device).expand(b, s)
            mask = build_attention_mask(attention_mask, b, s, past, x_BSH.device)
        cos_sin = self.rotary(position_ids, x_BSH.dtype)
        cache_kwargs = {"position_ids": position_ids}
        stats: list[RouterStats | None] = []
        # A cache would be written twice (forward and recompute), so layers with one run normally.
        recompute = (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                     and past_key_values is None)
        checkpoint = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint
        for layer in self.layers:
            if recompute and getattr(layer, "gradient_checkpointing", None) is not None:
                x_BSH, st = layer(x_BSH, cos_sin, mask, None)  # the layer checkpoints itself
            elif recompute:
                x_BSH, st = checkpoint(layer, x_BSH, cos_sin, mask, None)
            else:
                x_BSH, st = layer(x_BSH, cos_sin, mask, past_key_values, cache_kwargs, router_stats)
            stats.append(st)
        return self.norm(x_BSH), stats


class MoGEModel(Backbone, nn.Module):
    """The backbone (:class:`Backbone`) as a plain module: ``forward`` is :meth:`Backbone.backbone_forward`."""

    def __init__(self, config: MoGEConfig, layer_class: type[DecoderLayer] = DecoderLayer):
        super().__init__()
        self.init_backbone(config, layer_class)

    forward = Backbone.backbone_forward


def _checkpoint(fn, *args):
    """Non-reentrant activation checkpointing: RouterStats tensors keep their gradient (aux loss)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def make_lm_head(config: MoGEConfig, embed_tokens: nn.Embedding) -> nn.Linear:
    """The output head ``[V, H]``: its own matrix, or the embedding's with ``tie_word_embeddings``."""
    head = Linear(config.hidden_size, config.vocab_size, bias=False)
    if config.tie_word_embeddings:
        head.weight = embed_tokens.weight
    return head


def head_forward(lm_head: nn.Linear, h_BSH: Tensor, stats: list[RouterStats | None], labels: Tensor | None = None,
                 logits_to_keep: int | Tensor = 0,
                 num_items_in_batch: int | Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(logits, lm_loss, router_loss)`` from the final hidden states: the one place both the native
    model and the transformers wrapper compute them.

    ``logits_to_keep``: an int > 0 keeps the last that many positions, a tensor selects positions
    (transformers' convention). ``router_loss`` is the sum over MoE layers of the coefficient-scaled
    aux and z losses (None without MoE layers).
    """
    if isinstance(logits_to_keep, Tensor):
        V.tensor("logits_to_keep", logits_to_keep, "int")
    else:
        V.integer("logits_to_keep", logits_to_keep, 0)
    if labels is not None:
        V.tensor("labels", labels, "int")
        if labels.dim() == 2 and labels.shape[1] < 2:
            raise V.InvalidArgumentError(f"labels need at least 2 positions (position s predicts labels[s+1]), got "
                                         f"shape {tuple(labels.shape)}")
        if tuple(labels.shape) != tuple(h_BSH.shape[:2]):
            raise V.InvalidArgumentError(f"labels must be [B, S] = {list(h_BSH.shape[:2])} like input_ids, got "
                                         f"{tuple(labels.shape)}")
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():  # values only where reading is free
            V.ids_in_range("labels", labels, lm_head.out_features, allow=(-100,))
    if isinstance(logits_to_keep, Tensor):
        h_BSH = h_BSH[:, logits_to_keep]
    elif logits_to_keep:
        h_BSH = h_BSH[:, -logits_to_keep:]
    logits = lm_head(h_BSH)
    loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
    aux = [st.aux_loss + st.z_loss for st in stats if st is not None]
    return logits, loss, torch.stack(aux).sum() if aux else None


@torch.no_grad()
def init_module(mod: nn.Module, std: float) -> None:
    """Initialise one module's own parameters (also used by the transformers wrapper, module by module)."""
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        mod.weight.normal_(0.0, std)
        if getattr(mod, "bias", None) is not None:
            mod.bias.zero_()
    elif isinstance(mod, RMSNorm):
        mod.weight.fill_(1.0)
    elif isinstance(mod, MoGELayer):
        mod.router_scale.fill_(1.0)
        mod.experts.reset_parameters(std)


class MoGEForCausalLM(nn.Module):
    """Pangu Pro MoE causal LM: :class:`MoGEModel` plus an untied ``lm_head``, and ``config.num_mtp_layers``
    multi-token-prediction predictors in ``mtp`` (:mod:`moge.model.mtp`; empty by default, as released)."""

    def __init__(self, config: MoGEConfig):
        super().__init__()
        self.config = config
        self.model = MoGEModel(config)
        self.lm_head = make_lm_head(config, self.model.embed_tokens)
        self.mtp = make_predictors(config)
        use_kernels(self, self.model.kernels)  # the head and the MTP predictors share the model's choices
        self.init_weights()

    @property
    def kernels(self) -> KernelChoices:
        """The measured CPU kernel choices of this model (pin or save them here)."""
        return self.model.kernels

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, zero biases, unit norms and scales."""
        for mod in self.modules():
            init_module(mod, self.config.initializer_range)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, past_key_values: KVCache | None = None, use_cache: bool = False,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                logits_to_keep: int | Tensor = 0, check_ids: bool | None = None) -> ModelOutput:
        """Logits ``[B,S,V]``; with ``labels`` the shifted mean cross-entropy (``-100`` ignored).

        ``logits_to_keep > 0`` computes logits for the last that many positions only (generation).
        Bad inputs raise a named error first; ``check_ids`` is explained in :meth:`MoGEModel.check_inputs`.
        With MTP predictors, ``labels``, token ids and no cache, each predictor's loss and accuracy come
        back in ``mtp`` (the caller weights them: ``moge train --mtp-coef``), their routers' losses in
        ``aux_loss``.
        """
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        h_BSH, stats = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                  check_ids)
        logits, loss, aux = head_forward(self.lm_head, h_BSH, stats, labels, logits_to_keep)
        mtp = []
        if len(self.mtp) and labels is not None and input_ids is not None and past_key_values is None:
            mtp = mtp_losses(self, h_BSH, input_ids, labels, attention_mask, position_ids)
            extra = [o.router_stats.aux_loss + o.router_stats.z_loss for o in mtp if o.router_stats is not None]
            if extra:
                aux = torch.stack(extra).sum() + (aux if aux is not None else 0.0)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, router_stats=stats,
                           past_key_values=past_key_values if use_cache else None, mtp=mtp)


def count_parameters(config: MoGEConfig) -> dict[str, int]:
    """Total and per-token activated parameters, counted on the meta device (nothing is allocated).

    Activated counts every parameter a token touches, embedding and output head included (docs/design.md
    section 5): all but the (N - K) unchosen routed experts of each MoE layer. Both count the main
    model; ``mtp`` counts the MTP predictors' own parameters (they share the embedding and head).
    """
    with torch.device("meta"):
        model = MoGEForCausalLM(config)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    idle = 0
    for layer in model.model.layers:
        if layer.is_moe:
            per_expert = sum(p[0].numel() for p in layer.mlp.experts.parameters())
            idle += (config.num_experts - config.num_experts_per_tok) * per_expert
    return {"total": total, "activated": total - idle, "mtp": mtp}
