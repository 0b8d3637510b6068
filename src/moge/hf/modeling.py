"""The Pangu Pro MoE model classes for transformers: the shared base class, the base model and the causal LM.

The base model :class:`PanguProMoEModel` is a ``PreTrainedModel`` that is also moge's backbone
(:class:`~moge.model.Backbone`: embedding, decoder layers, norm, with the checkpoint's tensor names); the
causal LM and the heads hold it as ``model``, as transformers' own models hold theirs. The causal LM's
head, tying and losses are :mod:`moge.model`'s own functions, not copies. Loading and saving go
through :mod:`moge.checkpoint` (memory-mapped, experts stacked on load, split on save; see
:mod:`moge.hf.loading`).

The forward follows transformers' MoE models: ``MoeCausalLMOutputWithPast`` with ``aux_loss`` and
``router_logits`` (``output_router_logits``), ``hidden_states`` and ``attentions`` when asked, tuples
with ``return_dict=False``, the cache under either name transformers has used (``past_key_values``
up to 5.23, ``cache`` from 5.24), dynamic or static caches and 2-D or 4-D masks (see
:mod:`moge.hf.forward`), ``num_items_in_batch`` for exact gradient accumulation, and
``gradient_checkpointing_enable()``. Keyword arguments it does not know are refused with an error
naming them, never silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .. import validate as V
from ..checkpoint import save_pretrained as save_checkpoint
from ..checkpoint.hf_files import GENERATION_CONFIG_NAME
from ..checkpoint.io import write_json
from ..checkpoint.layout import PER_EXPERT_RE, from_published_state_dict
from ..experts import use_kernels
from ..model import Backbone, DecoderLayer, RotaryEmbedding, RouterStats, head_forward, init_module, make_lm_head
from ..model.mtp import make_predictors
from .config import PanGuMoEConfig, PanguProMoEConfig
from .forward import (BackboneOutput, UnsupportedArgumentError, check_router_loss_trainable, pick_cache,
                      exclude_padding, run_backbone, set_attention_kernels)
from .static_cache import cache_slots, is_static_cache, static_slot_mask
from .loading import BACKBONE_PREFIX, backbone_path, backbone_prefix, load, to_checkpoint_names, to_model_names

__all__ = ["PanGuMoEForCausalLM", "PanGuMoEModel", "PanguProMoEForCausalLM", "PanguProMoEModel",
           "PanguProMoEModelOutput", "PanguProMoEPreTrainedModel"]

# transformers 5.24 renamed the outputs' cache field from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# forward keyword arguments of transformers' TransformersKwargs for packed sequences: meaningful only
# with a varlen attention kernel, which this model does not have.
_PACKED_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "is_causal"}
# save_pretrained keywords that change nothing for a local safetensors save.
_HARMLESS_SAVE_KWARGS = {"safe_serialization", "save_function", "save_original_format"}
# From 5.24 transformers' models take the cache as `cache` and warn on the old name; 5.23's generate still
# passes `past_key_values`, so there the old name is the current one and stays silent.
_old_cache_name = (deprecate_kwarg("past_key_values", "5.40.0", new_name="cache") if _CACHE_FIELD == "cache"
                   else (lambda forward: forward))


_DENSE_MLP_RULE = re.compile(r"\.mlp\.(gate|up|down)_proj$")  # a dense layer's MLP, not the shared expert's




@dataclass
class PanguProMoEModelOutput(MoeModelOutputWithPast):
    """transformers' MoE base-model output plus ``router_stats``: each layer's
    :class:`~moge.model.RouterStats` when asked for (``output_router_stats=True``), else None."""

    router_stats: list[RouterStats | None] | None = None


class PanguProMoEDecoderLayer(GradientCheckpointingLayer, DecoderLayer):
    """:class:`moge.model.DecoderLayer` as transformers' ``GradientCheckpointingLayer``:
    ``gradient_checkpointing_enable()`` makes each layer recompute itself in the backward, as
    transformers' own decoder layers do (the backbone then passes it no cache)."""


class PanguProMoEPreTrainedModel(PreTrainedModel):
    """What every Pangu Pro MoE class shares: config class, initialisation, loading and saving."""

    config_class = PanguProMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PanguProMoEDecoderLayer"]
    _supports_sdpa = True
    # The forward compiles without graph breaks (transformers' full-graph compile of generate's decode
    # step, with a static cache): fixed-shape static-cache attention (moge.hf.static_cache), the experts'
    # graph-safe backend under compile (moge.experts.auto), no host reads while tracing.
    _can_compile_fullgraph = True
    _tied_weights_keys: dict[str, str] = {}

    def _init_weights(self, module: nn.Module) -> None:
        """The native model's initialisation, plus RoPE's frequency table (a buffer that ``to_empty`` wipes)."""
        init_module(module, self.config.initializer_range)
        if isinstance(module, RotaryEmbedding):
            cfg = self.config.to_moge_config()
            module.inv_freq.copy_(RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta).inv_freq)

    def init_parallel_plans(self) -> None:
        """transformers' plans, less the dense-MLP rules when the config has no dense layers (they would
        match nothing, and transformers warns about such rules at load)."""
        super().init_parallel_plans()
        if not self.config.mlp_only_layers:
            self._tp_plan = {k: v for k, v in self._tp_plan.items() if not _DENSE_MLP_RULE.search(k)}

    def set_attn_implementation(self, attn_implementation: Any, *args: Any, **kwargs: Any) -> None:
        """transformers' runtime switch (``"eager"``/``"sdpa"``), applied to moge's attention layers too:
        they hold their kernel, chosen when it changes, not looked up on every call."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        set_attention_kernels(self.get_submodule(backbone_path(self)), self.config._attn_implementation)

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(backbone_path(self)).embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the backbone's embedding, wherever this class keeps the backbone (heads: ``model.model``)."""
        self.get_submodule(backbone_path(self)).embed_tokens = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        config: PanguProMoEConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, **kwargs: Any):
        """Load a local released-layout directory (memory-mapped, built on the meta device).

        ``dtype`` (or the older ``torch_dtype``): ``"auto"``/None keeps the stored dtype, or
        ``torch.float32`` / ``torch.bfloat16`` / their names. The other keywords are described in
        :mod:`moge.hf.loading`. Hub downloads are not supported.
        """
        return load(cls, pretrained_model_name_or_path, model_args, config,
                    dtype if dtype is not None else torch_dtype, device_map, kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "2GB",
                        state_dict: dict[str, Tensor] | None = None, is_main_process: bool = True,
                        push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write the released layout (:func:`moge.checkpoint.save_pretrained`), the generation config and,
        for the heads, their labels; ``state_dict`` (e.g. from transformers' ``Trainer``) replaces the
        model's own. Pushing to the Hub is not supported."""
        unknown = sorted(set(kwargs) - _HARMLESS_SAVE_KWARGS)
        if push_to_hub or unknown:
            raise UnsupportedArgumentError(f"{type(self).__name__}.save_pretrained does not support "
                                           f"{unknown or ['push_to_hub']}")
        if not is_main_process:
            return
        sd = to_checkpoint_names(dict(state_dict if state_dict is not None else self.state_dict()), self)
        cfg = self.config
        overrides = {k: getattr(cfg, k) for k in ("use_cache", "output_router_logits")}
        gen = self.generation_config.to_diff_dict() if self.can_generate() else None
        directory = save_checkpoint(save_directory, cfg.to_moge_config(), sd, max_shard_size,
                                    config_overrides=overrides, generation_config=gen)
        if gen is None:  # the checkpoint writer always adds one; a model that cannot generate has none
            (directory / GENERATION_CONFIG_NAME).unlink(missing_ok=True)
        if not isinstance(self, PanguProMoEForCausalLM):  # labels and class of a head, for from_pretrained
            path = directory / "config.json"
            d = json.loads(path.read_text())
            d["architectures"] = [type(self).__name__]
            d.update({k: v for k, v in cfg.to_dict().items() if k in ("id2label", "label2id", "problem_type")})
            write_json(path, d)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes a state dict in the released layout (per-expert
        tensors, backbone under ``model.``), as transformers' ``Trainer`` reads back a saved checkpoint."""
        bb = backbone_prefix(self)
        # Checkpoint layout: per-expert tensors, or (base model) the backbone under `model.`, or (the others)
        # no backbone tensor under its own name
        released = (any(k.startswith(BACKBONE_PREFIX) for k in state_dict) if not bb
                    else not any(k.startswith(bb) for k in state_dict))
        if any(PER_EXPERT_RE.match(k) for k in state_dict) or released:
            cfg = self.config.to_moge_config()
            state_dict = to_model_names(from_published_state_dict(state_dict, cfg), self)
            head = getattr(self, "lm_head", None)
            if cfg.tie_word_embeddings and head is not None and "lm_head.weight" not in state_dict:
                state_dict["lm_head.weight"] = state_dict[bb + "embed_tokens.weight"]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class PanguProMoEModel(PanguProMoEPreTrainedModel, Backbone):
    """The base model (``AutoModel``): moge's backbone (:class:`~moge.model.Backbone`: ``embed_tokens``,
    ``layers``, ``norm``) as a ``PreTrainedModel``; ``forward`` returns the final hidden states.

    Its tensor-parallel plan is the config's ``base_model_tp_plan`` (transformers adds the embedding's
    vocabulary sharding); the causal LM and the heads take it, and the FSDP plan, under ``model.``.
    """

    # FSDP2: each decoder layer and the embedding their own shard group; the final norm kept whole.
    _fsdp_plan = {"embed_tokens": "free_full_weight", "layers.*": "free_full_weight", "norm": "keep_full_weight"}
    # What transformers' output recording would hook for `hidden_states` (each decoder layer's output[0]); the
    # forward records them itself (moge.hf.forward.record), with the same selection rules (indices).
    _can_record_outputs = {"hidden_states": PanguProMoEDecoderLayer}

    def __init__(self, config: PanguProMoEConfig):
        super().__init__(config)
        self.init_backbone(config.to_moge_config(), PanguProMoEDecoderLayer)
        self.post_init()
        set_attention_kernels(self, config._attn_implementation)

    @_old_cache_name
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Any = None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, output_router_logits: bool | None = None,
                output_hidden_states: bool | int | list[int] | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, cache: Any = None, num_items_in_batch: Any = None,
                output_router_stats: bool = False, **kwargs: Any) -> PanguProMoEModelOutput | tuple:
        """Final hidden states ``[B,S,H]`` (after the norm), the cache, and on request every layer's
        hidden states, attention probabilities and router logits ``[B*S,N]``. ``output_router_stats``
        adds each layer's :class:`~moge.model.RouterStats` (None for dense layers): expert counts, group
        loads and the scaled balance and z losses, from which the causal LM builds its losses.
        ``num_items_in_batch`` is accepted for transformers' ``Trainer`` and unused (no loss here)."""
        _check_forward_kwargs(type(self).__name__, kwargs)
        asked = self.config.output_router_logits if output_router_logits is None else output_router_logits
        out = run_backbone(self, input_ids, attention_mask, position_ids, pick_cache(cache, past_key_values),
                           inputs_embeds, use_cache, output_hidden_states, output_attentions,
                           router_stats=bool(asked or output_router_stats))
        res = PanguProMoEModelOutput(last_hidden_state=out.h_BSH, hidden_states=out.hidden_states,
                                     attentions=out.attentions,
                                     router_logits=_router_logits(self, out, output_router_logits),
                                     router_stats=out.stats if output_router_stats else None,
                                     **{_CACHE_FIELD: out.cache})
        return res if _return_dict(self, return_dict) else res.to_tuple()


class PanguProMoEForCausalLM(PanguProMoEPreTrainedModel, GenerationMixin):
    """Pangu Pro MoE causal LM for transformers: ``model`` (:class:`PanguProMoEModel`) plus ``lm_head``.

    ``forward`` returns :class:`~transformers.modeling_outputs.MoeCausalLMOutputWithPast` and accepts
    any cache with ``DynamicCache``'s interface, or a transformers static cache. A checkpoint's MTP
    predictors load into ``mtp`` and are written back by ``save_pretrained``; ``forward`` and
    ``generate`` ignore them (speculative decoding with them: :func:`moge.generate.generate`).
    """

    _tp_plan = {"lm_head": "colwise_gather_output"}  # the base model's plan joins under `model.`
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: PanguProMoEConfig):
        super().__init__(config)
        self.moge_config = config.to_moge_config()
        self.model = PanguProMoEModel(config)
        self.lm_head = make_lm_head(self.moge_config, self.model.embed_tokens)
        # MTP predictors (moge.model.mtp) are kept and saved, but forward / generate use the main model only.
        self.mtp = make_predictors(self.moge_config)
        use_kernels(self, self.model.kernels)  # the head and predictors share the backbone's kernel choices
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``, run under ``torch.inference_mode()`` instead of its ``no_grad``,
        so its decode steps take moge's few-rows CPU kernels (:mod:`moge.experts.linear`, the experts' ``gemv``),
        which apply in inference mode only. What it returns (ids, scores, the cache) is copied out of
        inference mode, so it can feed autograd as transformers' own ``generate`` output can (a loop
        that trains on generated ids); the copy costs one pass over the returned tensors."""
        with torch.inference_mode():
            out = super().generate(*args, **kwargs)
        return outside_inference_mode(out)

    @staticmethod
    def create_masks_for_generate(config: Any = None, inputs_embeds: Tensor | None = None,
                                  attention_mask: Tensor | None = None, cache: Any = None, **kwargs: Any) -> Any:
        """``generate``'s mask for a static cache: the fixed-shape ``[B,1,S,max_len]`` slot mask
        (:func:`~moge.hf.static_cache.static_slot_mask`), built outside the (possibly compiled) forward."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if inputs_embeds is None or cache is None or not is_static_cache(cache):
            return attention_mask
        b, s = inputs_embeds.shape[:2]
        return static_slot_mask(attention_mask, cache.get_seq_length(), b, s, cache_slots(cache), inputs_embeds.device)

    @_old_cache_name
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Any = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                output_router_logits: bool | None = None, output_hidden_states: bool | int | list[int] | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | Tensor = 0, cache: Any = None,
                num_items_in_batch: int | Tensor | None = None, shift_labels: Tensor | None = None,
                **kwargs: Any) -> MoeCausalLMOutputWithPast | tuple:
        """Logits ``[B,S,V]`` (or the last ``logits_to_keep``), the cache, and with ``labels`` the LM loss.

        ``attention_mask`` is the 2-D ``[B, past+S]`` padding mask (1 = real token; left padding is
        handled by position ids counted from each row's first real token) or a 4-D mask. With
        ``output_router_logits`` (argument or config) the output also holds every MoE layer's router
        logits ``[B*S, N]`` and ``aux_loss``: the paper's per-layer balance loss summed over layers,
        already multiplied by ``router_aux_loss_coef`` (plus the z-loss), which is added to ``loss``
        when ``labels`` are given. ``num_items_in_batch`` (transformers' ``Trainer``, gradient
        accumulation) makes the LM loss a sum over tokens divided by that count, and weights the aux
        loss by this batch's share of those tokens, so the micro-batches add up to one batch's loss.
        ``shift_labels`` ``[B,S]`` are targets already aligned with the logits (sequence/context
        parallel training shifts before sharding): given, they are the loss's targets and ``labels``
        is not shifted or used.
        """
        _check_forward_kwargs(type(self).__name__, kwargs)
        asked = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if (labels is not None or shift_labels is not None) and asked:
            check_router_loss_trainable(self.model)
        # The router statistics (losses) only when asked for: decoding skips them.
        base = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=False,
                          output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                          return_dict=True, output_router_stats=bool(asked),
                          **{_CACHE_FIELD: pick_cache(cache, past_key_values)})
        out = BackboneOutput(base.last_hidden_state, base.router_stats or [], getattr(base, _CACHE_FIELD),
                             base.hidden_states, base.attentions)
        if asked:
            out.stats = exclude_padding(out.stats, attention_mask, self.model)
        logits, loss, aux = head_forward(self.lm_head, out.h_BSH, out.stats, None if shift_labels is not None
                                         else labels, logits_to_keep, num_items_in_batch)
        if shift_labels is not None:
            loss = self._aligned_loss(logits, shift_labels, num_items_in_batch)
        router_logits = _router_logits(self, out, output_router_logits)
        if router_logits is not None and loss is not None and aux is not None:
            share = 1.0
            if num_items_in_batch is not None:
                targets = shift_labels if shift_labels is not None else labels[:, 1:]
                share = (targets != -100).sum().to(aux.device) / torch.as_tensor(num_items_in_batch).to(aux.device)
            loss = loss + aux * share
        res = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux if router_logits is not None else None, logits=logits,
                                        hidden_states=out.hidden_states, attentions=out.attentions,
                                        router_logits=router_logits, **{_CACHE_FIELD: out.cache})
        return res if _return_dict(self, return_dict) else res.to_tuple()


    def _aligned_loss(self, logits_BSV: Tensor, shift_labels_BS: Tensor, num_items_in_batch: Any) -> Tensor:
        """Cross-entropy against targets already aligned with the logits: transformers' own causal-LM loss."""
        V.tensor("shift_labels", shift_labels_BS, "int")
        if tuple(shift_labels_BS.shape) != tuple(logits_BSV.shape[:2]):
            raise V.InvalidArgumentError(f"shift_labels must be [B, S] = {list(logits_BSV.shape[:2])} like the "
                                         f"logits, got {tuple(shift_labels_BS.shape)}")
        return ForCausalLMLoss(logits_BSV, None, logits_BSV.shape[-1], num_items_in_batch=num_items_in_batch,
                               shift_labels=shift_labels_BS)


def outside_inference_mode(out: Any) -> Any:
    """``out`` with every inference tensor replaced by a normal copy: tensors, tuples/lists of them, model
    outputs and transformers caches (their layers' keys and values), recursively."""
    if isinstance(out, Tensor):
        return out.clone() if out.is_inference() else out
    if isinstance(out, ModelOutput):
        for k, v in list(out.items()):
            out[k] = outside_inference_mode(v)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(outside_inference_mode(v) for v in out)
    if isinstance(out, Cache):
        for layer in out.layers:
            for name in ("keys", "values"):
                if isinstance(getattr(layer, name, None), Tensor):
                    setattr(layer, name, outside_inference_mode(getattr(layer, name)))
    return out


def _router_logits(model: PanguProMoEPreTrainedModel, out: BackboneOutput, asked: bool | None) -> tuple | None:
    asked = model.config.output_router_logits if asked is None else asked
    return tuple(st.router_logits for st in out.stats if st is not None) if asked else None


def _return_dict(model: PanguProMoEPreTrainedModel, return_dict: bool | None) -> bool:
    return model.config.return_dict if return_dict is None else return_dict


def _check_forward_kwargs(who: str, kwargs: dict[str, Any]) -> None:
    packed = sorted(k for k in _PACKED_KWARGS & set(kwargs)
                    if kwargs[k] is not None and not (k == "is_causal" and kwargs[k] is True))
    if packed:
        raise UnsupportedArgumentError(f"packed-sequence arguments {packed} are not supported (no varlen "
                                       f"attention); pass padded batches with an attention_mask")
    unknown = sorted(set(kwargs) - _PACKED_KWARGS)
    if unknown:
        raise UnsupportedArgumentError(f"{who}.forward got unexpected keyword arguments {unknown}")


def draft_class(cls: type) -> type:
    """The same class for configs of the draft ``model_type: "PanGuMoE"`` (transformers maps each config
    class to one model class); it saves under the released name."""
    return type(cls.__name__.replace("PanguProMoE", "PanGuMoE"), (cls,),
                {"config_class": PanGuMoEConfig, "__module__": cls.__module__, "__doc__": draft_class.__doc__})


PanGuMoEModel = draft_class(PanguProMoEModel)
PanGuMoEForCausalLM = draft_class(PanguProMoEForCausalLM)
