"""Key/value caches for incremental decoding: one interface, a growing and a static implementation.

Shape legend (the package legend)
    B  batch     S  new positions     L  key/value positions returned by ``update``
    Hkv key/value heads (``g`` in model.py)     D  head dim
    C  slots of a static cache: ``capacity + 1`` (the last slot is a scratch slot, see below)

Both caches give :class:`moge.model.Attention` what it calls, ``update(k_BgSD, v_BgSD, layer_idx,
cache_kwargs) -> (k_BgLD, v_BgLD)`` and ``get_seq_length(layer_idx)``, the same surface as
transformers' ``DynamicCache``; and both can drop the newest positions (``rollback``) for speculative
decoding.

:class:`DynamicKVCache` concatenates: its tensors grow by S every call (new memory each step). It is
the training/plain-forward default.

:class:`StaticKVCache` is allocated once, ``[B, Hkv, C, D]`` per layer, and written in place. Row b
keeps its own tokens at slots ``0 .. lengths[b]-1`` in position order, so **a token's slot is its RoPE
position** and no padding is ever stored: a write goes to the slots named by
``cache_kwargs["position_ids"]``, where a negative position (a left-padding token) goes to the scratch
slot ``C-1``, which no query ever sees (queries sit at positions ``< C-1``). Which slots a query may
read is therefore one comparison, ``slot <= position``, whatever each row's length: see
:func:`moge.engine.step.causal_slot_mask`. ``lengths_B`` lives on the device and is advanced by the
caller (the decode step), so nothing here reads a tensor on the host; ``rollback(n_B)`` is one
subtraction, and the stale slots are simply overwritten by the next write.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import MoGEError
from ..memory import huge_pages_zeros


__all__ = ["CacheError", "DynamicKVCache", "RowSubsetCache", "StaticKVCache"]


class CacheError(MoGEError, ValueError):
    """A cache used outside what it supports (too long, a per-row rollback of a growing cache, ...)."""


class DynamicKVCache:
    """Growing per-layer key/value cache: each ``update`` appends ``[B, Hkv, S, D]`` along the positions.

    Same ``update`` / ``get_seq_length`` interface as transformers' ``DynamicCache``, so the model
    accepts either. Every row has the same length (left padding is stored and masked by the caller).
    """

    is_static = False

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, k_BgSD: Tensor, v_BgSD: Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values for ``layer_idx`` and return the full ``[B,Hkv,L,D]`` tensors."""
        if layer_idx == len(self.keys):
            self.keys.append(k_BgSD)
            self.values.append(v_BgSD)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k_BgSD], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v_BgSD], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0

    def rollback(self, n: int) -> None:
        """Drop the newest ``n`` positions of every row (the same n for all rows: rows share one length)."""
        if not isinstance(n, int) or n < 0:
            raise CacheError(f"a growing cache rolls back the same number of positions for every row "
                             f"(an int >= 0), got {n!r}; use a StaticKVCache for per-row rollback")
        if n:
            self.keys = [k[:, :, :-n] for k in self.keys]
            self.values = [v[:, :, :-n] for v in self.values]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.keys = [k.index_select(0, beam_idx) for k in self.keys]
        self.values = [v.index_select(0, beam_idx) for v in self.values]


class StaticKVCache:
    """Preallocated ``[B, Hkv, capacity+1, D]`` keys and values per layer, written in place per row.

    ``lengths_B`` (int64, on ``device``) counts each row's stored positions; the writer advances it
    (:meth:`advance`), :meth:`rollback` lowers it. ``capacity`` is the most positions a row can hold;
    callers check against it on the host before writing (a write past it would land out of range).
    """

    is_static = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, v in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("capacity", capacity)):
            if not isinstance(v, int) or v < 1:
                raise CacheError(f"StaticKVCache {name} must be a positive integer, got {v!r}")
        self.capacity, self.batch_size = capacity, batch_size
        shape = (batch_size, num_kv_heads, capacity + 1, head_dim)
        # On a CPU the planes, read whole by every step's attention, go on huge pages (moge.memory).
        planes = huge_pages_zeros([shape] * (2 * num_layers), dtype) if torch.device(device).type == "cpu" else None
        if planes is None:
            planes = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.keys, self.values = planes[:num_layers], planes[num_layers:]
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._rows_B1 = torch.arange(batch_size, device=device).view(batch_size, 1)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "StaticKVCache":
        """A cache shaped for ``model`` (a :class:`~moge.model.MoGEForCausalLM`, the transformers wrapper,
        or their ``.model``), in the model's dtype and device unless given."""
        base = getattr(model, "model", model)
        attn = base.layers[0].self_attn
        p = next(base.parameters())
        return cls(len(base.layers), batch_size, attn.n_kv, attn.head_dim, capacity,
                   dtype or p.dtype, device or p.device)

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """A cache over rows ``start .. stop-1`` sharing this one's buffers and lengths (views, no copy):
        writes and length changes through it land here. The continuous-batching scheduler prefills
        one row alone and decodes a leading bucket of rows this way, with one set of buffers."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.batch_size):
            raise CacheError(f"rows({start!r}, {stop!r}) is not a non-empty range of the cache's "
                             f"{self.batch_size} rows")
        view = object.__new__(StaticKVCache)
        view.capacity, view.batch_size = self.capacity, stop - start
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.lengths_B = self.lengths_B[start:stop]
        view._rows_B1 = torch.arange(stop - start, device=self.lengths_B.device).view(stop - start, 1)
        return view

    @property
    def slots(self) -> int:
        """C = capacity + 1 (the scratch slot included)."""
        return self.capacity + 1

    def update(self, k_BgSD: Tensor, v_BgSD: Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Write this call's keys/values at ``cache_kwargs["position_ids"] [B,S]`` (negative: not
        stored) and return the whole ``[B, Hkv, C, D]`` buffers; the caller's mask picks the slots."""
        pos_BS = None if cache_kwargs is None else cache_kwargs.get("position_ids")
        if pos_BS is None:
            raise CacheError("StaticKVCache.update needs cache_kwargs['position_ids'] (the slot of each new "
                             "token); drive the model through moge.engine (prefill / DecodeStep)")
        b, s = k_BgSD.shape[0], k_BgSD.shape[2]
        if b != self.batch_size:
            raise CacheError(f"StaticKVCache holds {self.batch_size} rows, got keys for {b}")
        # -1 indexes the scratch slot C-1: every padding token lands there and is never read.
        slot_BS = pos_BS.clamp(min=-1).expand(b, s)
        self.keys[layer_idx][self._rows_B1, :, slot_BS] = k_BgSD.transpose(1, 2)
        self.values[layer_idx][self._rows_B1, :, slot_BS] = v_BgSD.transpose(1, 2)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int | Tensor) -> None:
        """Count ``n`` more stored positions per row (an int or an int64 ``[B]`` tensor), in place."""
        self.lengths_B.add_(n)

    def rollback(self, n: int | Tensor) -> None:
        """Forget the newest ``n`` positions of each row (an int or ``[B]``): O(1), nothing is copied."""
        self.lengths_B.sub_(n)

    def reset(self, lengths_B: Tensor | None = None) -> None:
        """Empty every row (or set the lengths), keeping the buffers: the next writes overwrite them."""
        if lengths_B is None:
            self.lengths_B.zero_()
        else:
            self.lengths_B.copy_(lengths_B)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest row's length. Reads a device tensor on the host (a sync on CUDA): not for the
        decode loop, which keeps positions on the device."""
        return int(self.lengths_B.max())

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for buf in (*self.keys, *self.values):
            buf.copy_(buf.index_select(0, beam_idx))
        self.lengths_B.copy_(self.lengths_B.index_select(0, beam_idx))


class RowSubsetCache:
    """Rows ``rows_R`` of a :class:`StaticKVCache`, in any order and not necessarily contiguous, as one
    batch: ``update`` writes each row's new keys/values into its row of the underlying buffers and
    returns those rows' first ``attend`` slots (a gathered copy, ``[R, Hkv, attend, D]``).

    The continuous-batching scheduler prefills the prompts of requests admitted into scattered rows
    in one forward this way (one pass over the weights instead of one per request). ``lengths_B`` is
    a copy of those rows' lengths; :meth:`advance` updates it and writes it back.
    """

    is_static = True

    def __init__(self, cache: StaticKVCache, rows_R: Tensor, attend: int):
        if not 1 <= attend <= cache.capacity:
            raise CacheError(f"attend={attend} must be in [1, {cache.capacity}]")
        self.base, self.rows_R, self.attend = cache, rows_R, attend
        self.capacity, self.batch_size = cache.capacity, len(rows_R)
        self.lengths_B = cache.lengths_B[rows_R]
        self._rows_R1 = rows_R.view(-1, 1)

    def update(self, k_RgSD: Tensor, v_RgSD: Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Write at ``cache_kwargs["position_ids"] [R,S]`` (negative: the scratch slot) in the chosen rows;
        return their first ``attend`` slots."""
        pos_RS = None if cache_kwargs is None else cache_kwargs.get("position_ids")
        if pos_RS is None:
            raise CacheError("RowSubsetCache.update needs cache_kwargs['position_ids']")
        slot_RS = pos_RS.clamp(min=-1).expand(k_RgSD.shape[0], k_RgSD.shape[2])
        keys, values = self.base.keys[layer_idx], self.base.values[layer_idx]
        keys[self._rows_R1, :, slot_RS] = k_RgSD.transpose(1, 2)
        values[self._rows_R1, :, slot_RS] = v_RgSD.transpose(1, 2)
        return keys[self.rows_R, :, :self.attend], values[self.rows_R, :, :self.attend]

    @property
    def slots(self) -> int:
        return self.capacity + 1

    def advance(self, n: int | Tensor) -> None:
        self.lengths_B.add_(n)
        self.base.lengths_B[self.rows_R] = self.lengths_B

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths_B.max())
