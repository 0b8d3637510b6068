"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling, with no host sync.

Shape legend
    B  rows     V  vocabulary

Sampling draws from the filtered softmax with the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``
i.i.d. per entry, which picks token i with probability exactly ``p_i`` (the minimum of independent
exponentials ``E_i / p_i`` falls on i with probability ``p_i / sum p``). Unlike ``torch.multinomial``
it is one elementwise pass and an argmax: no host sync and no data-dependent shapes on CUDA, so it
can follow a CUDA-graph replay, and it is reproducible with a ``torch.Generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_next"]


def sample_next(logits_BV: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row: argmax at temperature 0, else sample from the temperature-scaled,
    top-k and nucleus (top-p) filtered softmax. Computed in float32; returns ``[B]`` int64.
    Bad arguments are named errors (metadata and Python numbers only: no host sync)."""
    from .. import validate as V

    V.tensor("logits", logits_BV, "float", dims=2, nonempty=True)
    V.number("temperature", temperature, 0.0)
    V.integer("top_k", top_k, 0)
    V.number("top_p", top_p, 0.0, 1.0, lo_open=True)
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        p_sorted_BV = sorted_BV.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        drop_BV = (p_sorted_BV.cumsum(-1) - p_sorted_BV) >= top_p
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), float("-inf"))
    probs_BV = logits_BV.softmax(-1)
    # A zero draw would make 0/0 = NaN (argmax's favourite) for a filtered-out token.
    race_BV = torch.empty_like(probs_BV).exponential_(generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs_BV / race_BV).argmax(-1)
