"""The transformers wrapper's forward around the backbone (:class:`~moge.model.Backbone`, which the base
model :class:`~moge.hf.PanguProMoEModel` is): inputs as transformers passes them, outputs as transformers'
decoder models return them.

Inputs. The cache comes as a ``DynamicCache`` (or moge's ``KVCache``) or as a transformers static
cache (``StaticCache``, what ``generate(cache_implementation="static")`` makes), which the model attends
at fixed shapes over all its slots (:mod:`moge.hf.static_cache`). A 4-D mask (``[B,1,S,L]``, boolean or
additive float) is converted to the boolean form the model takes.

Outputs. ``output_hidden_states`` (True, or the indices to keep) gives transformers' tuple of
``num_hidden_layers + 1`` states: the embeddings, each decoder layer's output, the last one after the
final norm. ``output_attentions`` gives each layer's attention probabilities ``[B,Hq,S,L]``: for
that call the attention runs eagerly (:func:`moge.model.attention.eager_attention`) and the probabilities
are the ones the output is computed from (with their gradient). Both are recorded by hooks installed
for one call only, so nothing is paid when they are not asked for. ``attn_implementation="eager"``
makes every call eager (:func:`set_attention_kernels`).

Shape legend (the package's)
    B batch   S new positions   L key/value positions (past + S)   H hidden   Hq / Hkv query / key-value
    heads (``h`` / ``g`` in suffixes, as in :mod:`moge.model`)   D head dim
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import find_packed_sequence_indices

from ..model.attention import ATTENTION_KERNELS, eager_attention
from ..errors import MoGEError
from ..model.moe import RouterStats
from ..routing import aux_loss, router_scores, z_loss
from ..model import Backbone, positions_from_padding
from .static_cache import StaticSlots, cache_slots, is_static_cache, static_slot_mask


class UnsupportedArgumentError(MoGEError, TypeError):
    """A keyword argument the model does not implement; the message names it."""


def bool_mask(mask_B1SL: Tensor, past: int) -> Tensor:
    """A 4-D transformers mask as the model's boolean ``[B,1,S,past+S]`` (True = attend).

    Boolean masks are taken as they are; float masks are additive (0 = attend). Columns past the filled
    positions of a static cache are dropped, and a query row with nothing to attend (a padded position)
    attends to itself, as :func:`moge.model.build_attention_mask` does, so SDPA never sees an empty row.
    """
    allowed = mask_B1SL if mask_B1SL.dtype == torch.bool else mask_B1SL == 0
    s = allowed.shape[-2]
    allowed = allowed[..., : past + s]
    if allowed.shape[-1] != past + s:
        raise ValueError(f"a 4-D attention_mask must cover past+S = {past + s} key positions, got {allowed.shape[-1]}")
    own_1S1L = torch.zeros(s, past + s, dtype=torch.bool, device=allowed.device)
    own_1S1L[torch.arange(s), torch.arange(past, past + s)] = True
    return allowed | (own_1S1L & ~allowed.any(-1, keepdim=True))


def hidden_state_indices(output_hidden_states: bool | int | list[int] | None, n_states: int) -> set[int] | None:
    """The kept indices of the ``n_states`` hidden states (None = none asked for), transformers' rules:
    True keeps all, an int or a list of ints (negative counted from the end) keeps those."""
    if output_hidden_states is None or output_hidden_states is False:
        return None
    if output_hidden_states is True:
        return set(range(n_states))
    sel = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {i % n_states for i in sel if -n_states <= i < n_states}


@dataclass
class Recorded:
    """What one forward recorded: hidden states (None where not kept) and attention probabilities."""
    hidden_states: list[Tensor | None] = field(default_factory=list)
    attentions: list[Tensor] = field(default_factory=list)


@contextlib.contextmanager
def record(backbone: Backbone, hidden: set[int] | None, attentions: bool) -> Iterator[Recorded]:
    """Record hidden states (the kept ``hidden`` indices) and/or attention probabilities during one
    forward of ``backbone``; everything installed is removed on exit (so a recompute under activation
    checkpointing records nothing). Attention is recorded by running each layer's attention through
    :func:`moge.model.attention.eager_attention` for this call: the probabilities returned are the ones the
    output was computed from, gradient included."""
    rec = Recorded()
    handles = []

    def keep(t: Tensor) -> None:
        rec.hidden_states.append(t if len(rec.hidden_states) in hidden else None)

    def recording_kernel(*args) -> Tensor:
        o, probs = eager_attention(*args)
        rec.attentions.append(probs)
        return o

    if hidden is not None:
        handles.append(backbone.layers[0].register_forward_pre_hook(lambda mod, args: keep(args[0])))
        for layer in backbone.layers:
            handles.append(layer.register_forward_hook(lambda mod, args, out: keep(out[0])))
    kernels = [layer.self_attn.attention_kernel for layer in backbone.layers]
    if attentions:
        for layer in backbone.layers:
            layer.self_attn.attention_kernel = recording_kernel
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        for layer, kernel in zip(backbone.layers, kernels):
            layer.self_attn.attention_kernel = kernel


def set_attention_kernels(backbone: Backbone, implementation: str | None) -> None:
    """Give every attention layer the kernel transformers' ``attn_implementation`` names (``eager`` or
    ``sdpa``; None or anything else transformers accepted for this model: SDPA)."""
    kernel = ATTENTION_KERNELS.get(implementation or "sdpa", ATTENTION_KERNELS["sdpa"])
    for layer in backbone.layers:
        layer.self_attn.attention_kernel = kernel


@dataclass
class BackboneOutput:
    """One backbone forward as the wrapper classes use it."""
    h_BSH: Tensor
    stats: list[RouterStats | None]
    cache: Any
    hidden_states: tuple[Tensor | None, ...] | None
    attentions: tuple[Tensor, ...] | None


def exclude_padding(stats: list[RouterStats | None], attention_mask: Tensor | None, backbone: Backbone
                    ) -> list[RouterStats | None]:
    """The layers' balance and z losses over the real tokens of a 2-D padding mask only, as transformers'
    MoE losses count them (padding would otherwise pull the balance towards whatever the pad token
    routes to). Each layer's own formula and coefficients (:meth:`moge.model.moe.MoGELayer.stats`); only the
    tokens counted differ."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return stats
    out = []
    for st, layer in zip(stats, backbone.layers):
        if st is None or st.router_logits is None:
            out.append(st)
            continue
        moe = layer.mlp
        keep_T = attention_mask[:, -st.num_tokens // attention_mask.shape[0]:].reshape(-1).bool()
        logits_TN, ids_TK = st.router_logits[keep_T], st.expert_ids[keep_T]
        zero = logits_TN.new_zeros(())
        aux = (aux_loss(router_scores(logits_TN, False), ids_TK, moe.aux_loss_coef, check=False)
               if moe.aux_loss_coef and len(ids_TK) else zero)
        z = z_loss(logits_TN, moe.z_loss_coef) if moe.z_loss_coef and len(ids_TK) else zero
        out.append(dataclasses.replace(st, aux_loss=aux, z_loss=z))
    return out


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache passed under either name transformers has used (``cache`` from 5.24, ``past_key_values``)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise UnsupportedArgumentError("pass the cache once: as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def check_router_loss_trainable(backbone: Backbone) -> None:
    """Refuse reentrant activation checkpointing while the router loss trains: a reentrant checkpoint
    returns the layers' RouterStats outside autograd, so the aux loss would get no gradient, silently."""
    fn = getattr(backbone, "_gradient_checkpointing_func", None)
    if (backbone.gradient_checkpointing and backbone.training and torch.is_grad_enabled()
            and getattr(fn, "keywords", {}).get("use_reentrant")):
        raise UnsupportedArgumentError("output_router_logits=True with use_reentrant=True activation checkpointing "
                                       "would train without the router's aux loss; use use_reentrant=False "
                                       "(transformers' default)")


def _inputs(cache: Any, attention_mask: Tensor | None, position_ids: Tensor | None, input_ids: Tensor | None,
            inputs_embeds: Tensor | None) -> tuple[Any, Tensor | None, Tensor | None]:
    """``(cache, mask, positions)`` as the backbone takes them: a static cache as :class:`StaticSlots`
    with its ``[B,1,S,L]`` slot mask and positions; a 4-D mask as the boolean ``[B,1,S,past+S]``."""
    x = input_ids if input_ids is not None else inputs_embeds
    b, s = x.shape[:2]
    if attention_mask is not None and attention_mask.dim() not in (2, 4):
        raise UnsupportedArgumentError(f"attention_mask must be 2-D [batch, past+seq] or 4-D [batch, 1, seq, keys]; "
                                       f"got {attention_mask.dim()}-D")
    if cache is not None and is_static_cache(cache):
        slots, past = cache_slots(cache), cache.get_seq_length()  # past: a device tensor, not read here
        if attention_mask is None and not torch.compiler.is_compiling() and int(past) + s > slots:
            raise ValueError(f"the static cache holds {slots} positions, this call needs {int(past) + s}")
        if position_ids is None:
            position_ids = (positions_from_padding(attention_mask)[:, -s:] if attention_mask is not None
                            and attention_mask.dim() == 2 else (torch.arange(s, device=x.device) + past).expand(b, s))
        return StaticSlots(cache), static_slot_mask(attention_mask, past, b, s, slots, x.device), position_ids
    if attention_mask is not None and attention_mask.dim() == 4:
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = bool_mask(attention_mask, past)
        if position_ids is None:  # a 4-D mask does not say where a row starts: positions count from the cache
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, -1)
    elif attention_mask is None and position_ids is not None and (cache is None or cache.get_seq_length() == 0):
        attention_mask = packed_sequence_mask(position_ids.expand(b, -1))
    return cache, attention_mask, position_ids


def packed_sequence_mask(position_ids_BS: Tensor) -> Tensor | None:
    """Packed sequences (``DataCollatorWithFlattening``: no mask, positions restart at 0 where a sequence
    starts, as transformers detects them, :func:`transformers.masking_utils.find_packed_sequence_indices`):
    the boolean ``[B,1,S,S]`` block-diagonal causal mask, so no token attends across sequences. None when
    every row is one sequence (plain causal attention)."""
    seq_BS = find_packed_sequence_indices(position_ids_BS)
    if seq_BS is None:
        return None
    s = seq_BS.shape[1]
    causal_SS = torch.ones(s, s, dtype=torch.bool, device=seq_BS.device).tril()
    return (seq_BS[:, None, :, None] == seq_BS[:, None, None, :]) & causal_SS


def run_backbone(backbone: Any, input_ids: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
                 cache: Any, inputs_embeds: Tensor | None, use_cache: bool | None,
                 output_hidden_states: bool | int | list[int] | None, output_attentions: bool | None,
                 router_stats: bool = True) -> BackboneOutput:
    """Run ``backbone`` (the base model, a :class:`~moge.model.Backbone` with the transformers config) on
    transformers-style inputs (see the module docstring), through :meth:`~moge.model.Backbone.backbone_forward`.

    ``use_cache`` defaults to the config's, and is switched off (with a warning, as transformers' models
    do) while activation checkpointing trains; a missing cache is a new ``DynamicCache``.
    ``router_stats=False`` skips the routers' statistics (their ``stats`` are None).
    """
    config = backbone.config
    if isinstance(attention_mask, dict):
        raise UnsupportedArgumentError("attention_mask must be a tensor (2-D padding mask or 4-D mask), not a dict "
                                       "of per-layer-type masks")
    use_cache = config.use_cache if use_cache is None else use_cache
    if use_cache and backbone.gradient_checkpointing and backbone.training and torch.is_grad_enabled():
        warnings.warn("use_cache=True is incompatible with gradient checkpointing; running with use_cache=False",
                      stacklevel=3)
        use_cache = False
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    run_cache, attention_mask, position_ids = _inputs(cache if use_cache else None, attention_mask, position_ids,
                                                      input_ids, inputs_embeds)
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    hidden = hidden_state_indices(output_hidden_states, len(backbone.layers) + 1)
    attentions = config.output_attentions if output_attentions is None else output_attentions
    with record(backbone, hidden, bool(attentions)) as rec:
        h_BSH, stats = backbone.backbone_forward(input_ids, attention_mask, position_ids, run_cache, inputs_embeds,
                                                 router_stats=router_stats)
    hs = None
    if hidden is not None:
        if len(backbone.layers) in hidden:  # the last state is taken after the final norm (transformers' rule)
            rec.hidden_states[-1] = h_BSH
        hs = tuple(rec.hidden_states)
    return BackboneOutput(h_BSH, stats, cache if use_cache else None, hs,
                          tuple(rec.attentions) if attentions else None)
