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

from .. import validate as V

__all__ = ["race_sample", "sample_next", "sample_rows", "sampling_probs"]


def sampling_probs(logits_V: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution :func:`sample_next` samples from at ``temperature > 0``: the temperature-scaled,
    top-k and nucleus (top-p) filtered softmax over the last dimension, in float32, any leading shape.
    Speculative decoding scores the main model's and the drafter's tokens under exactly this rule."""

    V.tensor("logits", logits_V, "float", nonempty=True)
    V.number("temperature", temperature, 0.0, lo_open=True)
    V.integer("top_k", top_k, 0)
    V.number("top_p", top_p, 0.0, 1.0, lo_open=True)
    return _filtered_probs(logits_V.float(), temperature, top_k, top_p)


def _filtered_probs(logits_V: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    logits_V = logits_V / temperature
    if top_k and top_k < logits_V.shape[-1]:
        kth_1 = logits_V.topk(top_k, dim=-1).values[..., -1:]
        logits_V = logits_V.masked_fill(logits_V < kth_1, float("-inf"))
    if top_p < 1.0:
        sorted_V, order_V = logits_V.sort(dim=-1, descending=True)
        p_sorted_V = sorted_V.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        drop_V = (p_sorted_V.cumsum(-1) - p_sorted_V) >= top_p
        logits_V = logits_V.masked_fill(drop_V.scatter(-1, order_V, drop_V), float("-inf"))
    return logits_V.softmax(-1)


def race_sample(weights_V: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row drawn with probability ``weights / weights.sum()`` (unnormalised weights are
    fine) by the exponential race ``argmax(w / E)``; int64, the leading shape of ``weights``."""
    # A zero draw would make 0/0 = NaN (argmax's favourite) for a filtered-out token.
    race_V = torch.empty_like(weights_V).exponential_(generator=generator).clamp_(min=torch.finfo(weights_V.dtype).tiny)
    return (weights_V / race_V).argmax(-1)


def sample_next(logits_BV: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row: argmax at temperature 0, else sample from the temperature-scaled,
    top-k and nucleus (top-p) filtered softmax. Computed in float32; returns ``[B]`` int64.
    Bad arguments are named errors (metadata and Python numbers only: no host sync)."""

    V.tensor("logits", logits_BV, "float", dims=2, nonempty=True)
    V.number("temperature", temperature, 0.0)
    V.integer("top_k", top_k, 0)
    V.number("top_p", top_p, 0.0, 1.0, lo_open=True)
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1)
    return race_sample(_filtered_probs(logits_BV, temperature, top_k, top_p), generator)


def _filtered_probs_rows(logits_BV: Tensor, temperature_B: Tensor, top_k_B: Tensor, top_p_B: Tensor) -> Tensor:
    """:func:`_filtered_probs` with each row's own settings (float32 ``[B]`` temperature > 0 and top_p,
    int64 ``[B]`` top_k, 0 = off): the same operations row by row, so a row's distribution is the one
    the scalar rule gives it alone."""
    vocab = logits_BV.shape[-1]
    logits_BV = logits_BV / temperature_B.view(-1, 1)
    use_k_B1 = ((top_k_B > 0) & (top_k_B < vocab)).view(-1, 1)
    if bool(use_k_B1.any()):
        sorted_BV = logits_BV.sort(dim=-1, descending=True).values
        kth_B1 = sorted_BV.gather(-1, (top_k_B.clamp(1, vocab) - 1).view(-1, 1))
        logits_BV = logits_BV.masked_fill(use_k_B1 & (logits_BV < kth_B1), float("-inf"))
    use_p_B1 = (top_p_B < 1.0).view(-1, 1)
    if bool(use_p_B1.any()):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        p_sorted_BV = sorted_BV.softmax(-1)
        drop_BV = ((p_sorted_BV.cumsum(-1) - p_sorted_BV) >= top_p_B.view(-1, 1)) & use_p_B1
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV.softmax(-1)


def sample_rows(logits_BV: Tensor, temperature_B: Tensor, top_k_B: Tensor, top_p_B: Tensor,
                generators: list[torch.Generator | None]) -> Tensor:
    """One token per row under per-row settings (``[B]`` tensors; temperature 0 = greedy) and per-row
    generators: row b gets what :func:`sample_next` gives it alone with ``generators[b]``, whatever the
    other rows hold (its noise comes from its own generator). Returns ``[B]`` int64.

    The continuous-batching scheduler's sampler; it reads which rows sample on the host (a sync on
    CUDA), as the scheduler reads the new tokens anyway."""
    logits_BV = logits_BV.float()
    out_B = logits_BV.argmax(-1)
    hot = (temperature_B > 0).nonzero().flatten().tolist()
    if not hot:
        return out_B
    idx_R = torch.tensor(hot, device=logits_BV.device)
    probs_RV = _filtered_probs_rows(logits_BV[idx_R], temperature_B[idx_R], top_k_B[idx_R], top_p_B[idx_R])
    race_RV = torch.empty_like(probs_RV)
    for r, b in enumerate(hot):  # each row draws from its own stream, as it would alone
        race_RV[r].exponential_(generator=generators[b])
    race_RV.clamp_(min=torch.finfo(probs_RV.dtype).tiny)
    out_B[idx_R] = (probs_RV / race_RV).argmax(-1)
    return out_B
