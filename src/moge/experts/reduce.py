"""Reduce-form products for a compiled CPU decode step: one row times a weight, written so that
Inductor streams the weight at the memory's speed.

Shape legend
    R  rows     I  input features     O  output features
    T  tokens   H  hidden    N  routed experts    F  expert intermediate size    K  experts per token
    P  token-expert pairs (T*K)

At one row a matrix product is a weight stream, and on a CPU neither of torch's eager kernels
streams at the memory's speed: ``F.linear`` reads float32 and bfloat16 weights at 17-23 GB/s at one
row on the 2-core AMD EPYC VM that reads 60-80 GB/s with ``x.sum()``. The same product written as a
broadcast multiply and a sum over the input dimension, ``(W[O,I] * x[1,I]).sum(-1)``, is a reduction
that Inductor's C++ backend compiles to one vectorised loop per output block, parallel over the
outputs, reading each weight once: 59 GB/s for a 32000 x 768 head in float32 and bfloat16
(``benchmarks/probe_reduce.py``; the accumulation is float32 for either). In eager mode that
expression would materialise the ``[O, I]`` product, so these functions are only worth calling while
``torch.compile`` traces: :func:`moge.experts.linear.linear` and ``auto``'s experts use them there,
and nowhere else.

The routed experts use the same trick with the gather folded in: ``(gate_up[ids] * x).sum(-1)``
compiles to a loop that reads each chosen expert's rows in place (an indirect load), so the K
touched experts are read once, without a copy, without a host sync and with fixed shapes (the
step stays one graph). At more than one row per weight the reduction form loses badly (Inductor
re-reads the weight per row), so it is used for one row per weight only: one-row linears, and
experts at decode sizes, where each token-expert pair is one row times its own expert's weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager import is_float_weight
from .registry import register_experts_backend
from .sorted import sorted_experts


__all__ = ["reduce_experts", "reduce_linear", "reduce_rows"]


def _accumulation(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (the weight is converted as it is read), float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def reduce_linear(x_1I: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``F.linear`` of one row in reduce form (float32 accumulation, result in ``x``'s dtype): fast
    only when compiled (see the module docstring)."""
    acc = _accumulation(x_1I)
    y_1O = (weight_OI.unsqueeze(0).to(acc) * x_1I.unsqueeze(1).to(acc)).sum(-1)
    if bias_O is not None:
        y_1O = y_1O + bias_O.to(acc)
    return y_1O.to(x_1I.dtype)


def reduce_rows(w_NOI: Any, x_PI: Tensor, ids_P: Tensor) -> Tensor:
    """Row p of ``x`` times matrix ``ids_P[p]`` of ``w`` in reduce form, ``[P, O]`` in ``x``'s dtype: a
    float stack inline, a quantized kind through its own ``reduce_rows`` (the weight-kind seam; e.g.
    :class:`moge.quant.WeightOnlyLinear` dequantizes inside the same reduction)."""
    if is_float_weight(w_NOI):
        return (w_NOI[ids_P].to(x_PI.dtype) * x_PI.unsqueeze(1)).sum(-1)
    return w_NOI.reduce_rows(x_PI, ids_P)


@register_experts_backend("reduce")
def reduce_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                   kernels: Any = None) -> Tensor:
    """The routed experts pair by pair in reduce form, each pair's expert weights gathered inside the
    reduction: sync-free, fixed shapes, for a compiled decode step on CPU (in eager mode it
    materialises ``[P, 2F, H]``, so ``auto`` picks it only under ``torch.compile``). Quantized weights
    with a ``reduce_rows`` method (weight-only int8/int4) are dequantized inside the reduction; other
    kinds (W8A8) go through the ``sorted`` loop."""
    if not all(is_float_weight(w) or hasattr(w, "reduce_rows") for w in (gate_up_N2FH, down_NHF)):
        return sorted_experts(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)
    t, k = ids_TK.shape
    f = down_NHF.shape[2]
    acc = _accumulation(x_TH)
    ids_P, token_P, w_P = ids_TK.reshape(-1), torch.arange(t * k, device=x_TH.device) // k, w_TK.reshape(-1)
    if t > 1:
        # Pairs of one expert next to each other: its second read comes from the cache, so a batch
        # reads about the distinct experts it touches rather than T*K of them.
        order_P = torch.argsort(ids_P, stable=True)
        ids_P, token_P, w_P = ids_P[order_P], token_P[order_P], w_P[order_P]
    x_PH = x_TH.to(acc)[token_P]
    gu_P2F = reduce_rows(gate_up_N2FH, x_PH, ids_P)
    h_PF = F.silu(gu_P2F[:, :f]) * gu_P2F[:, f:] * w_P.unsqueeze(1).to(acc)
    out_PH = reduce_rows(down_NHF, h_PF, ids_P)
    return out_PH.new_zeros(t, out_PH.shape[1]).index_add_(0, token_P, out_PH).to(x_TH.dtype)
