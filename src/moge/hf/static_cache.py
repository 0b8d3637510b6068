"""transformers' static caches (``StaticCache``, what ``generate(cache_implementation="static")`` makes) at
fixed shapes.

A static cache preallocates ``[B,Hkv,max_len,D]`` per layer and writes each call's keys at its own
device-side length counter, returning every slot. The model attends over all ``max_len`` slots through a
boolean ``[B,1,S,max_len]`` mask (:func:`static_slot_mask`): no shape depends on how full the cache is and
nothing is read back to the host, so a compiled forward (transformers' full-graph compile of the decode
step) neither breaks nor recompiles as the cache fills. moge's own engine decodes the same way over its
:class:`~moge.model.StaticKVCache`; :class:`StaticSlots` gives the backbone a transformers cache in that form.

Shape legend: B batch, S new positions, L cache slots (``max_len``), W width of a 2-D padding mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def is_static_cache(cache: Any) -> bool:
    """True for transformers caches with preallocated fixed-length layers (``StaticCache`` and kin)."""
    return bool(getattr(cache, "is_compileable", False))


def cache_slots(cache: Any) -> int:
    """How many positions each layer of a transformers static cache holds (its ``max_cache_len``)."""
    return int(getattr(cache, "max_cache_len", None) or cache.layers[0].max_cache_len)


class StaticSlots:
    """A transformers static cache as the backbone's static-cache interface (``is_static``, ``slots``):
    ``update`` writes in place and returns all slots; the caller passes the ``[B,1,S,L]`` mask and the
    positions (:meth:`moge.model.Backbone.backbone_forward`'s fixed-shape path)."""

    is_static = True

    def __init__(self, cache: Any):
        self.cache, self.slots = cache, cache_slots(cache)

    def update(self, k_BgSD: Tensor, v_BgSD: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self.cache.update(k_BgSD, v_BgSD, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> Any:
        """The filled length (transformers' 0-d device tensor; the fixed-shape path never reads it)."""
        return self.cache.get_seq_length()


def static_slot_mask(attention_mask: Tensor | None, past: Any, b: int, s: int, slots: int,
                     device: torch.device) -> Tensor:
    """The boolean ``[B,1,S,L]`` mask (True = attend) of S new tokens written at slots ``past..past+S-1``.

    ``past`` is the cache's length (an int, or transformers' 0-d device tensor: no host read). Without a
    mask or with a 2-D ``[B, W]`` padding mask (W = past + S, 1 = real token), query i sees slot j when
    ``j <= past + i`` and slot j holds a real token. A 4-D mask (boolean, or additive float: 0 = attend)
    already says which slots each query sees; its columns are padded with False (or cut) to L. A query
    with nothing to see (a padding position) sees its own slot, so SDPA never gets an empty row.
    """
    q_S = torch.arange(s, device=device) + past
    slots_L = torch.arange(slots, device=device)
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = F.pad(allowed, (0, slots - allowed.shape[-1]))[..., :slots].to(device)
    else:
        allowed = slots_L.view(1, 1, 1, slots) <= q_S.view(1, 1, s, 1)
        if attention_mask is not None:
            w = attention_mask.shape[-1]
            if w > slots:
                raise ValueError(f"the static cache holds {slots} positions, this call needs {w}")
            real_BL = F.pad(attention_mask.to(device).bool(), (0, slots - w))
            allowed = allowed & real_BL.view(b, 1, 1, slots)
    own_1SL = slots_L.view(1, 1, 1, slots) == q_S.view(1, 1, s, 1)
    return allowed | (own_1SL & ~allowed.any(-1, keepdim=True))
