"""The ``sorted`` experts backend: per-expert GEMMs on contiguous sorted segments, with a fused backward.

Shape legend
    T  tokens        H  hidden size       N  routed experts       F  expert intermediate size
    K  experts per token (selected ids / weights are [T, K])      P  token-expert pairs (T*K)
    R  rows of one chunk of sorted pairs

Pairs are sorted by expert (one host sync for the counts), cut into chunks of whole experts of at most
:data:`_CHUNK_BYTES` of activations, and each expert's rows go through :func:`moge.experts.expert_linear`
(float or int8 weights). The backward is hand-written (:class:`_SortedExperts`) and reuses the forward's
pre-activations. The CPU choice at prefill and training sizes; registered as ``sorted`` in
:mod:`moge.experts` (imported by it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .eager import expert_linear, is_float_weight, sort_pairs
from .registry import register_experts_backend


__all__ = ["sorted_experts"]


# Rows per chunk are capped so every temporary stays near this size: glibc serves blocks above its
# mmap threshold (at most 32 MiB) with fresh mmaps, and first-touching those pages cost more than the
# copies themselves on our CPU VMs; 8 MiB buffers are recycled from the heap and stay cache-friendly.
_CHUNK_BYTES = 8 * 2**20


def _segments(counts: list[int], max_rows: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Split the sorted pairs into chunks of whole experts with at most ``max_rows`` rows (or one expert).

    Returns ``[(start, end, [(expert, a, b), ...]), ...]`` with ``a, b`` relative to the chunk start;
    experts without rows are left out.
    """
    chunks, segs, chunk_start, pos = [], [], 0, 0
    for e, c in enumerate(counts):
        if not c:
            continue
        if segs and pos + c - chunk_start > max_rows:
            chunks.append((chunk_start, pos, segs))
            segs, chunk_start = [], pos
        segs.append((e, pos - chunk_start, pos + c - chunk_start))
        pos += c
    if segs:
        chunks.append((chunk_start, pos, segs))
    return chunks


def _sorted_forward(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any):
    """The ``sorted`` forward for either weight kind: ``(y, chunks, order, token, wsort, saved_gu)``.

    Float down weights get the gate weight on the ``[rows, F]`` activation (cheaper than on the output);
    quantized ones get it as an output row scale, so they quantize the unweighted activation.
    """
    n, f2, h = gate_up_N2FH.shape
    order_P, token_P, counts_N = sort_pairs(ids_TK, n)
    counts = counts_N.tolist()  # the one host sync
    chunks = _segments(counts, max(1, _CHUNK_BYTES // (h * x_TH.element_size())))
    wsort_P1 = w_TK.reshape(-1)[order_P].unsqueeze(-1).to(x_TH.dtype)
    float_down = is_float_weight(down_NHF)
    keep = float_down and is_float_weight(gate_up_N2FH)  # the pre-activations the backward reuses
    y_TH = torch.zeros_like(x_TH)
    saved_gu = []
    for start, end, segs in chunks:
        tok_R = token_P[start:end]
        xs_RH = x_TH.index_select(0, tok_R)
        gu_R2F = x_TH.new_empty(end - start, f2)
        for e, a, b in segs:
            expert_linear(xs_RH[a:b], gate_up_N2FH, e, out=gu_R2F[a:b])
        g_RF, u_RF = gu_R2F.chunk(2, dim=-1)
        hw_RF = F.silu(g_RF).mul_(u_RF)
        w_R1 = wsort_P1[start:end]
        if float_down:
            hw_RF.mul_(w_R1)
        out_RH = x_TH.new_empty(end - start, h)
        for e, a, b in segs:
            expert_linear(hw_RF[a:b], down_NHF, e, None if float_down else w_R1[a:b], out=out_RH[a:b])
        y_TH.index_add_(0, tok_R, out_RH)
        if keep:
            saved_gu.append(gu_R2F)
    return y_TH, chunks, order_P, token_P, wsort_P1, saved_gu


class _SortedExperts(torch.autograd.Function):
    """All routed experts as one autograd node: per-expert GEMMs on contiguous sorted segments.

    Pairs are sorted by expert and processed in chunks of whole experts (see ``_CHUNK_BYTES``): gather
    the chunk's token rows, one GEMM per expert into a preallocated buffer, SwiGLU and the gate weight
    on the ``[rows, F]`` activation, a second GEMM per expert, and ``index_add_`` into the output.
    The hand-written backward walks the same chunks, recomputes the gathered input and the SwiGLU
    from the saved pre-activation, writes each expert's weight gradient straight into its slice and
    runs the SwiGLU backward as a few elementwise ops per chunk. Versus autograd over the same ops
    this keeps no ``[T*K, H]`` intermediates alive and never builds a zero ``[N, ...]`` gradient for
    experts that got rows. It needs the per-expert counts on the host: one sync, free on a CPU.
    """

    @staticmethod
    def forward(ctx, x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF):
        y_TH, chunks, order_P, token_P, wsort_P1, saved_gu = _sorted_forward(x_TH, ids_TK, w_TK, gate_up_N2FH,
                                                                             down_NHF)
        ctx.chunks, ctx.k, ctx.w_dtype, ctx.saved_gu = chunks, ids_TK.shape[1], w_TK.dtype, saved_gu
        ctx.save_for_backward(x_TH, order_P, token_P, wsort_P1, gate_up_N2FH, down_NHF)
        return y_TH

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TH):
        x_TH, order_P, token_P, wsort_P1, gate_up_N2FH, down_NHF = ctx.saved_tensors
        need_x, need_w, need_gu, need_down = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        dy_TH = dy_TH.contiguous()
        dx_TH = torch.zeros_like(x_TH) if need_x else None
        d_gu = torch.empty_like(gate_up_N2FH) if need_gu else None
        d_down = torch.empty_like(down_NHF) if need_down else None
        dw_P = x_TH.new_empty(order_P.numel()) if need_w else None
        used = [False] * down_NHF.shape[0]
        for (start, end, segs), gu_R2F in zip(ctx.chunks, ctx.saved_gu):
            tok_R = token_P[start:end]
            w_R1 = wsort_P1[start:end]
            dout_RH = dy_TH.index_select(0, tok_R)
            g_RF, u_RF = gu_R2F.chunk(2, dim=-1)
            sig_RF = torch.sigmoid(g_RF)
            silu_RF = g_RF * sig_RF
            h_RF = silu_RF * u_RF
            hw_RF = h_RF * w_R1 if need_down else None
            dhw_RF = h_RF.new_empty(h_RF.shape)
            for e, a, b in segs:
                used[e] = True
                if need_down:
                    torch.mm(dout_RH[a:b].t(), hw_RF[a:b], out=d_down[e])
                torch.mm(dout_RH[a:b], down_NHF[e], out=dhw_RF[a:b])
            if need_w:
                dw_P[start:end] = (dhw_RF * h_RF).sum(-1)
            if not (need_x or need_gu):
                continue
            dh_RF = dhw_RF.mul_(w_R1)
            # silu'(g) = sig * (1 + g * (1 - sig))
            dgu_R2F = torch.cat([dh_RF * u_RF * sig_RF * (1 + g_RF * (1 - sig_RF)), dh_RF * silu_RF], dim=-1)
            xs_RH = x_TH.index_select(0, tok_R) if need_gu else None
            dxs_RH = x_TH.new_empty(end - start, x_TH.shape[1]) if need_x else None
            for e, a, b in segs:
                if need_gu:
                    torch.mm(dgu_R2F[a:b].t(), xs_RH[a:b], out=d_gu[e])
                if need_x:
                    torch.mm(dgu_R2F[a:b], gate_up_N2FH[e], out=dxs_RH[a:b])
            if need_x:
                dx_TH.index_add_(0, tok_R, dxs_RH)
        for e, hit in enumerate(used):
            if not hit:  # experts that got no rows: zero gradient
                if need_down:
                    d_down[e].zero_()
                if need_gu:
                    d_gu[e].zero_()
        dw_TK = None
        if need_w:
            dw_TK = torch.empty_like(dw_P).index_copy_(0, order_P, dw_P).view(x_TH.shape[0], ctx.k).to(ctx.w_dtype)
        ctx.saved_gu = None
        return dx_TH, None, dw_TK, d_gu, d_down


@register_experts_backend("sorted", host_sync=True)
def sorted_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
                   kernels: Any = None) -> Tensor:
    """Per-expert GEMMs on contiguous sorted segments with a fused hand-written backward.

    One host sync (the per-expert counts) per call; the fastest choice on CPU at both prefill and
    decode sizes. See :class:`_SortedExperts`. Quantized weights run the same loop without an autograd node.
    """
    if not (is_float_weight(gate_up_N2FH) and is_float_weight(down_NHF)):
        return _sorted_forward(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)[0]
    return _SortedExperts.apply(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)
