"""The generation loop on the engine's pieces: prefill, the fixed-shape step (or its CUDA graph), sampling.

Shape legend
    B  batch (padded up to a bucket with CUDA graphs)     W  prompt width (left-padded)
    N  new tokens     V  vocabulary

Per token: sample on the device, write the token into a preallocated ``[B, N]`` buffer, update the
finished flags on the device, run the step. The host reads nothing inside the loop except the
"every row finished?" flag once every ``check_every`` tokens; the output is trimmed afterwards to
where every row had finished, so it equals the plain loop's (which checks after every token).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..model.cache import CacheError, StaticKVCache
from .graphs import GraphCaptureError, GraphedStep, batch_bucket
from .sampling import sample_next
from .step import DecodeStep, attended_slots, prefill


__all__ = ["DecodeEngine"]


class DecodeEngine:
    """Generation state for one model, reusable across calls: per batch size (a bucket with CUDA
    graphs) one :class:`StaticKVCache` of ``capacity`` positions per row, its :class:`DecodeStep`,
    and with ``cuda_graphs`` the step captured as a CUDA graph (default: on when the model is on CUDA);
    ``compile=True`` compiles the step with ``torch.compile`` (the fast CPU path at batch 1, see
    :class:`~moge.engine.step.DecodeStep`).

    ``decode`` takes arguments already checked by :func:`moge.generate.generate`, the public front.
    """

    def __init__(self, model: nn.Module, capacity: int, cuda_graphs: bool | None = None, check_every: int = 8,
                 compile: bool = False):
        self.model, self.capacity, self.check_every = model, capacity, max(1, check_every)
        self.compile = compile
        self.device = next(model.parameters()).device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise CacheError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        self._slots: dict[int, tuple[StaticKVCache, DecodeStep, GraphedStep | None]] = {}

    def _slot(self, batch: int) -> tuple[StaticKVCache, DecodeStep, GraphedStep | None]:
        if batch not in self._slots:
            cache = StaticKVCache.for_model(self.model, batch, self.capacity)
            step = DecodeStep(self.model, cache, compile=self.compile)
            graphed = None
            if self.cuda_graphs:
                try:
                    graphed = GraphedStep(step)
                except GraphCaptureError as e:
                    warnings.warn(f"{e}; decoding without CUDA graphs", stacklevel=3)
                    self.cuda_graphs = False
            self._slots[batch] = (cache, step, graphed)
        return self._slots[batch]

    @torch.inference_mode()
    def decode(self, ids_BW: Tensor, mask_BW: Tensor | None, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, eos: Sequence[int] = (), pad_token_id: int = 0,
               generator: torch.Generator | None = None) -> Tensor:
        """``[b, W + n]``: the prompts and up to ``max_new_tokens`` new tokens (see moge.generate)."""
        b, width = ids_BW.shape
        if width + max_new_tokens > self.capacity:
            raise CacheError(f"prompt width {width} + {max_new_tokens} new tokens exceed the engine's capacity "
                             f"{self.capacity}")
        bsz = batch_bucket(b) if self.cuda_graphs else b
        mask_BW = torch.ones_like(ids_BW) if mask_BW is None else mask_BW.to(ids_BW.device, torch.long)
        if bsz > b:  # filler rows: one real (pad) token each, results dropped
            fill_ids = torch.full((bsz - b, width), pad_token_id, dtype=ids_BW.dtype, device=ids_BW.device)
            fill_mask = torch.zeros_like(fill_ids)
            fill_mask[:, -1] = 1
            ids_BW, mask_BW = torch.cat([ids_BW, fill_ids]), torch.cat([mask_BW, fill_mask])
        cache, step, graphed = self._slot(bsz)
        cache.reset()
        logits_B1V, _ = prefill(self.model, cache, ids_BW, mask_BW, kv_len=width)
        eos_E = torch.tensor(list(eos), dtype=torch.long, device=ids_BW.device)
        out_BN = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=ids_BW.device)
        finished_B = torch.zeros(bsz, dtype=torch.bool, device=ids_BW.device)
        n = max_new_tokens
        for t in range(max_new_tokens):
            next_B = sample_next(logits_B1V[:, -1], temperature, top_k, top_p, generator)
            if len(eos):
                next_B = torch.where(finished_B, torch.full_like(next_B, pad_token_id), next_B)
                finished_B |= torch.isin(next_B, eos_E)
            out_BN[:, t] = next_B
            if t + 1 == max_new_tokens:
                break
            if len(eos) and (t + 1) % self.check_every == 0 and bool(finished_B[:b].all()):
                n = t + 1
                break
            if graphed is not None:
                logits_B1V, _ = graphed(next_B.view(bsz, 1))
            else:
                kv_len = attended_slots(width + t + 1, self.capacity)
                logits_B1V, _ = step(next_B.view(bsz, 1), kv_len=kv_len)
        new_bn = out_BN[:b, :n]
        if len(eos):  # stop where the plain loop would have: right after the last row's first EOS
            hit_bn = torch.isin(new_bn, eos_E)
            if bool(hit_bn.any(1).all()):
                new_bn = new_bn[:, :int(hit_bn.int().argmax(1).max()) + 1]
        return torch.cat([ids_BW[:b], new_bn], dim=1)
