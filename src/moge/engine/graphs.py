"""A decode step captured as one CUDA graph, the way vLLM and SGLang run decoding.

Shape legend
    B  batch (a bucket size)     S  new positions per row     V  vocabulary     H  hidden

A :class:`~moge.engine.step.DecodeStep` has fixed shapes and makes no host sync, so one capture
records every kernel of a step (about a thousand launches for the ``small`` preset) and each token
then costs one ``graph.replay()``. The graph reads its inputs from buffers it owns: ``__call__``
copies the new ids into the static ``[B,S]`` input, replays, and returns the static logits and
hidden states (overwritten by the next replay). Positions come from the cache's lengths, which the
replay advances on the device. One graph per batch bucket: :func:`batch_bucket` rounds a batch up to
the next captured size, and the caller pads rows.

Capture needs a sync-free experts backend: ``auto`` is ``grouped_mm`` on CUDA, for MoGE and top-K
alike (on one device the expert offsets stay on the device either way). A backend that reads counts
on the host (``sorted``, ``gemv``, ``eager``) cannot be captured; :class:`GraphedStep` then raises
:class:`GraphCaptureError` naming it, and ``moge.generate`` falls back to the eager step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import MoGEError
from .step import DecodeStep

__all__ = ["BUCKETS", "GraphCaptureError", "GraphedStep", "batch_bucket"]

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphCaptureError(MoGEError, RuntimeError):
    """The decode step could not be captured as a CUDA graph; the message says why."""


def batch_bucket(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding ``batch`` rows (the batch itself beyond the largest bucket)."""
    return next((b for b in buckets if b >= batch), batch)


class GraphedStep:
    """``step`` captured once; ``graphed(ids_BS) -> (logits [B,S,V], hidden [B,S,H])`` replays it.

    Capture runs ``warmup`` eager steps on a side stream first (cuBLAS / SDPA workspaces, lazy
    initialisation), then records one step. Both write keys/values at the rows' next positions and
    advance the lengths; the lengths are restored afterwards, and the stale slots are overwritten by
    the real steps before any query can see them (a query at position p reads slots <= p only).
    """

    def __init__(self, step: DecodeStep, warmup: int = 2, pool=None):
        cache = step.cache
        if cache.lengths_B.device.type != "cuda":
            raise GraphCaptureError("CUDA graphs need the model and cache on a CUDA device")
        self.step = step
        self.ids_BS = torch.zeros(cache.batch_size, step.num_new, dtype=torch.long, device=cache.lengths_B.device)
        saved_B = cache.lengths_B.clone()
        # Capture at the start of the cache so warmup writes land in slots prefill overwrites.
        cache.lengths_B.zero_()
        self.graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(self.ids_BS)
            torch.cuda.current_stream().wait_stream(side)
            cache.lengths_B.zero_()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits_BSV, self.hidden_BSH = step(self.ids_BS)
        except RuntimeError as e:  # e.g. a host sync ("operation not permitted when stream is capturing")
            raise GraphCaptureError(f"could not capture the decode step as a CUDA graph ({str(e).splitlines()[0]}); "
                                    f"the experts backend must be sync-free (grouped_mm, CUDA's auto)") from None
        finally:
            cache.lengths_B.copy_(saved_B)

    @torch.inference_mode()
    def __call__(self, ids_BS: Tensor) -> tuple[Tensor, Tensor]:
        self.ids_BS.copy_(ids_BS)
        self.graph.replay()
        return self.logits_BSV, self.hidden_BSH
