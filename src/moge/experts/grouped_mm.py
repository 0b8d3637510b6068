"""The ``grouped_mm`` experts backend: two ``F.grouped_mm`` calls over expert-sorted pairs, no Python loop
and no host sync (the CUDA choice, and what CUDA graphs capture).

Shape legend: T tokens, H hidden, N experts, F expert intermediate, K experts per token, P pairs (T*K).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager import is_float_weight, sort_by_expert, swiglu
from .reduce import reduce_rows
from .registry import register_experts_backend
from .sorted import sorted_experts


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``F.grouped_mm``'s backward rejects a non-contiguous (e.g. expanded, from ``y.sum().backward()``)
    grad_output; putting this right after each grouped matmul hands it a dense gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _grouped_linear(x_PI: Tensor, w_NOI: Tensor, offsets_N: Tensor, expert_P: Tensor) -> Tensor:
    """Row p of ``x`` times expert ``expert_P[p]``'s ``[out, in]`` matrix: ``[P, I] -> [P, O]``.

    Uses ``F.grouped_mm`` where it has a kernel (float32/bf16 with rows a multiple of 16 bytes; only
    bf16 while torch traces, as its meta kernel takes nothing else); otherwise (float64, odd sizes,
    float32 under ``torch.export`` / ``torch.compile``) a per-pair batched matmul on gathered weights:
    still no expert loop and no host sync, but it copies one weight matrix per pair, so it is a
    correctness fallback, not a fast path; traced by ``torch.compile`` without autograd, the same
    product as a multiply-and-sum, which Inductor computes without the copy.
    """
    row_bytes = (x_PI.shape[-1] * x_PI.element_size(), w_NOI.shape[1] * x_PI.element_size())
    dtypes = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32, torch.bfloat16)
    if (x_PI.dtype in dtypes and hasattr(F, "grouped_mm")
            and all(b % 16 == 0 for b in row_bytes)):  # the kernel needs 16-byte aligned row strides
        return _ContiguousGrad.apply(F.grouped_mm(x_PI, w_NOI.transpose(1, 2), offs=offsets_N))
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        # Traced, a multiply-and-sum reads each pair's weight in place (Inductor fuses the gather into
        # the reduction): no [P, O, I] copy, which at prefill sizes would not fit in memory.
        return reduce_rows(w_NOI, x_PI.to(torch.promote_types(x_PI.dtype, torch.float32)), expert_P).to(x_PI.dtype)
    return torch.bmm(w_NOI[expert_P], x_PI.unsqueeze(-1)).squeeze(-1)


@register_experts_backend("grouped_mm")
def grouped_mm_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                       kernels: Any = None) -> Tensor:
    """Sort pairs by expert, two grouped matmuls, un-permute and sum the K slots: no loop, no host sync.

    The gate weight is applied to the ``[P, F]`` activation before the down projection (the
    projection is linear, so this is exact) because that tensor is H/F times smaller than the output.
    The K outputs of a token are combined by an inverse-permutation gather and a ``[T, K, H]`` sum
    instead of zeros + index_add: deterministic and one pass over memory. Quantized weights go through
    the ``sorted`` loop (there is no grouped int8 matmul to call).
    """
    if not (is_float_weight(gate_up_N2FH) and is_float_weight(down_NHF)):
        return sorted_experts(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)
    t, k = ids_TK.shape
    order_P, token_P, offsets_N = sort_by_expert(ids_TK, gate_up_N2FH.shape[0])
    expert_P = ids_TK.reshape(-1)[order_P]
    h_PF = swiglu(_grouped_linear(x_TH[token_P], gate_up_N2FH, offsets_N, expert_P))
    h_PF = h_PF * w_TK.reshape(-1)[order_P].unsqueeze(-1).to(h_PF.dtype)
    out_PH = _grouped_linear(h_PF, down_NHF, offsets_N, expert_P)
    inv_P = torch.empty_like(order_P).scatter_(0, order_P, torch.arange(order_P.numel(), device=order_P.device))
    return out_PH[inv_P].view(t, k, out_PH.shape[-1]).sum(1)
