"""Inference engine: KV caches, the fixed-shape decode step, CUDA graphs and sampling.

``moge.generate.generate`` is the front; this package is what it runs. See docs/inference.md.

* :mod:`.cache`: :class:`DynamicKVCache` (growing) and :class:`StaticKVCache` (preallocated, per-row
  lengths on the device, O(1) per-row rollback).
* :mod:`.sampling`: greedy / temperature / top-k / top-p without host syncs.
* :mod:`.step`: :func:`prefill` and :class:`DecodeStep` (S new tokens per row against a static cache,
  fixed shapes, no host sync).
* :mod:`.graphs`: :class:`GraphedStep`, a decode step captured as one CUDA graph per batch bucket.
* :mod:`.decode`: the generation loop on those pieces.
* :mod:`.scheduler`: continuous batching of requests (per-row sampling settings, chunked prefill,
  aborts) over one static cache, what ``moge serve`` runs.
* :mod:`.drafting`: MTP speculative decoding for the scheduler's rows (``moge serve --speculative``).
"""

from ..model.cache import CacheError, DynamicKVCache, StaticKVCache
from .sampling import sample_next


__all__ = ["CacheError", "DynamicKVCache", "StaticKVCache", "sample_next"]
