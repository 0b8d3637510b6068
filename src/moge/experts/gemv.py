"""The ``gemv`` experts backend: decode sizes on CPU, a few rows per touched expert.

Shape legend
    T  tokens        H  hidden size       N  routed experts       F  expert intermediate size
    K  experts per token (selected ids / weights are [T, K])      P  token-expert pairs (T*K)

At decode a routed expert gets one or a few rows, so its two products are weight streams: the time
is the time of reading the expert's ``gate_up [2F,H]`` and ``down [H,F]`` once. Each product goes
through :func:`moge.experts.linear.few_rows_linear`, which runs the kernel measured fastest on this CPU for
that weight shape and row count (``F.linear`` or ``(W @ x^T)^T``, see :mod:`moge.experts.linear`), and the
rest of the work is done once for all pairs: one SwiGLU pass and one combine. Per expert that is two
products and no other op (a per-expert loop of several small ops costs, at these sizes, as much time
as reading the weights).

One token (batch-1 decoding) skips the sort: each of its K experts gets the token's row itself, and
the K outputs are summed. Otherwise pairs are sorted by expert (one host sync for the counts, free
on a CPU) and scattered back with ``index_add_``. Differentiable through autograd. Quantized weights
run the ``sorted`` loop (they have their own int8 kernel there).

Registered as ``gemv`` in :mod:`moge.experts` (imported by it). On CPU under ``torch.inference_mode()``
at up to :data:`moge.experts.GEMV_MAX_ROWS` pairs per expert ``auto`` takes ``gemv`` or ``grouped_mm``,
whichever :func:`decode_experts` measured faster on its first real calls of that shape. Routed experts
of 12 ``small`` layers, cold weights, 2 threads, ms for gemv / sorted / grouped_mm: 15.7 / 18.7 / 20.0
at 1 token, 94 / 90 / 88 at 8 tokens, 179 / 144 / 122 at 32 tokens on the Intel VM; on the AMD VM
(``benchmarks/bench_decode_experts.py``) 10.1 / 18.5 / 18.2 at 1 token and 62.1 / 115.7 / 105.5 at 8
tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .choice import KernelChoices
from .eager import is_float_weight, sort_pairs
from .grouped_mm import grouped_mm_experts
from .linear import few_rows_linear
from .registry import register_experts_backend
from .sorted import sorted_experts


__all__ = ["decode_backend", "decode_experts", "gemv_experts"]


def _one_token(x_1H: Tensor, ids_1K: Tensor, w_1K: Tensor, gate_up_N2FH: Tensor, down_NHF: Tensor,
               kernels: KernelChoices | None) -> Tensor:
    """T = 1: every chosen expert multiplies the same row; no sort, no gather, no scatter."""
    f = down_NHF.shape[2]
    ids = ids_1K[0].tolist()
    gu_K2F = torch.cat([few_rows_linear(x_1H, gate_up_N2FH[e], None, kernels) for e in ids])
    h_KF = F.silu(gu_K2F[:, :f]) * gu_K2F[:, f:] * w_1K.view(-1, 1).to(x_1H.dtype)
    out_KH = torch.cat([few_rows_linear(h_KF[k:k + 1], down_NHF[e], None, kernels) for k, e in enumerate(ids)])
    return out_KH.sum(0, keepdim=True)


@register_experts_backend("gemv", host_sync=True)
def gemv_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                 kernels: KernelChoices | None = None) -> Tensor:
    """Decode sizes on CPU: each touched expert's rows times its weights through the fastest few-rows
    kernel, so each touched expert's weights are read once (see the module docstring)."""
    if not (is_float_weight(gate_up_N2FH) and is_float_weight(down_NHF)):
        return sorted_experts(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)  # int8: the sorted loop
    t, f = x_TH.shape[0], down_NHF.shape[2]
    if t == 1 and ids_TK.numel():
        return _one_token(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF, kernels)
    order_P, token_P, counts_N = sort_pairs(ids_TK, gate_up_N2FH.shape[0])
    segs, start = [], 0
    for e, c in enumerate(counts_N.tolist()):
        if c:
            segs.append((e, start, start + c))
            start += c
    if not segs:  # no tokens
        return torch.zeros_like(x_TH)
    xs_PH = x_TH.index_select(0, token_P)
    w_P1 = w_TK.reshape(-1)[order_P].unsqueeze(-1).to(x_TH.dtype)
    gu_P2F = torch.cat([few_rows_linear(xs_PH[a:b], gate_up_N2FH[e], None, kernels) for e, a, b in segs])
    h_PF = F.silu(gu_P2F[:, :f]) * gu_P2F[:, f:] * w_P1
    out_PH = torch.cat([few_rows_linear(h_PF[a:b], down_NHF[e], None, kernels) for e, a, b in segs])
    return x_TH.new_zeros(t, x_TH.shape[1]).index_add_(0, token_P, out_PH)


# What ``auto`` measures at decode sizes on a CPU.
DECODE_CANDIDATES = {"gemv": gemv_experts, "grouped_mm": grouped_mm_experts}


def _decode_key(x_TH: Tensor, ids_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any) -> str:
    return (f"{tuple(gate_up_N2FH.shape)}|{tuple(down_NHF.shape)}|tk={tuple(ids_TK.shape)}|{x_TH.dtype}"
            f"|threads={torch.get_num_threads()}")


def decode_backend(x_TH: Tensor, ids_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                   kernels: KernelChoices | None) -> str | None:
    """The decode-size CPU backend ``kernels`` chose for this call's key (weights' shapes, ``[T,K]``,
    dtype, threads), or None while :func:`decode_experts` is still timing the candidates on that key's
    first calls. Quantized weights, and no ``kernels``: ``gemv``."""
    if kernels is None or not (is_float_weight(gate_up_N2FH) and is_float_weight(down_NHF)):
        return "gemv"
    return kernels.get("decode_experts", _decode_key(x_TH, ids_TK, gate_up_N2FH, down_NHF))


def decode_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                   kernels: KernelChoices | None = None) -> Tensor:
    """``auto``'s experts at decode sizes on CPU: the first calls of a key alternate between
    :data:`DECODE_CANDIDATES`, each timed by ``kernels`` (3 calls each, the calls of all layers with
    that shape counted together, so the weights are as cold as in a real step), then the fastest is
    kept by ``kernels``. Every call computes the real result. Without ``kernels``: ``gemv``."""
    args = (x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)
    name = decode_backend(x_TH, ids_TK, gate_up_N2FH, down_NHF, kernels)
    if name is not None:
        return DECODE_CANDIDATES[name](*args, kernels=kernels)
    return kernels.run("decode_experts", _decode_key(x_TH, ids_TK, gate_up_N2FH, down_NHF),
                       {c: (lambda f=f: f(*args, kernels=kernels)) for c, f in DECODE_CANDIDATES.items()})
