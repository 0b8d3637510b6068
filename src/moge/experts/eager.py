"""The ``eager`` experts backend (the per-expert reference loop, the test oracle) and the helpers every
backend shares: the one place an expert's matrix is touched, and the sort of token-expert pairs.

Shape legend: T tokens, H hidden, N experts, F expert intermediate, K experts per token, P pairs (T*K),
R rows, I/O a matrix's input/output features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing import expert_counts
from .registry import register_experts_backend


def expert_linear(x_RI: Tensor, w: Any, e: int, row_scale_R1: Tensor | None = None,
                  out: Tensor | None = None) -> Tensor:
    """Rows ``x [R, I]`` times expert ``e``'s ``[O, I]`` matrix of ``w`` -> ``[R, O]``, each output row
    multiplied by ``row_scale`` when given.

    ``w`` is a float tensor ``[N, O, I]`` or quantized stacked weights (see the module docstring); this
    is the only place backends touch an expert's matrix.
    """
    if isinstance(w, Tensor):
        y_RO = torch.mm(x_RI, w[e].t(), out=out)
        if row_scale_R1 is None:
            return y_RO
        # out-of-place unless writing into a buffer: autograd needs the product for the scale's gradient
        return y_RO.mul_(row_scale_R1) if out is not None else y_RO * row_scale_R1
    return w.matmul(x_RI, e, row_scale_R1, out)


def is_float_weight(w: Any) -> bool:
    """True for plain float stacked weights, False for a quantized kind."""
    return isinstance(w, Tensor)


def swiglu(h_P2F: Tensor) -> Tensor:
    gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
    return F.silu(gate_PF) * up_PF


@register_experts_backend("eager", host_sync=True)
def eager_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                  kernels: Any = None) -> Tensor:
    """Reference: loop over experts, gather each one's tokens, run its MLP, scatter-add the result."""
    y_TH = torch.zeros_like(x_TH)
    for e in range(gate_up_N2FH.shape[0]):
        tok_P, slot_P = torch.where(ids_TK == e)
        if tok_P.numel() == 0:
            continue
        h_PF = swiglu(expert_linear(x_TH[tok_P], gate_up_N2FH, e))
        out_PH = expert_linear(h_PF, down_NHF, e, w_TK[tok_P, slot_P].unsqueeze(-1).to(x_TH.dtype))
        y_TH = y_TH.index_add(0, tok_P, out_PH)
    return y_TH


def sort_pairs(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the flattened ``[T*K]`` token-expert pairs by expert, without a host sync.

    Returns ``(order_P, token_P, counts_N)``: ``order_P`` sorts the pairs by expert (stable, so tokens
    stay in order within an expert), ``token_P`` is the token of each sorted pair and ``counts_N`` the
    pairs per expert (int64). Every sort-by-expert in the package (backends, EP dispatch) goes through here.
    """
    flat_P = ids_TK.reshape(-1)
    order_P = torch.argsort(flat_P, stable=True)
    return order_P, order_P // ids_TK.shape[1], expert_counts(ids_TK, num_experts, check=False)


def sort_by_expert(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sort_pairs` with the counts as int32 cumulative offsets (the end of each expert's rows),
    the form ``F.grouped_mm`` takes: ``(order_P, token_P, offsets_N)``."""
    order_P, token_P, counts_N = sort_pairs(ids_TK, num_experts)
    return order_P, token_P, torch.cumsum(counts_N, 0).to(torch.int32)
