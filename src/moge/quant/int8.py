"""Int8 arithmetic of W8A8: per-output-channel weight quantization, static / dynamic activation
quantization, and the int8 matmul beside its dequantize oracle.

Shape legend
    R  rows (tokens) of one matmul     I  input features     O  output features

Weights are symmetric int8 in [-127, 127] with one scale per output channel. Activations are int8 in
[-128, 127]: *static* with one calibrated per-tensor scale (and an integer zero point ``input_offset``,
0 when we quantize, honoured when a checkpoint has one), or *dynamic* with one scale per row taken from
the row's own absolute maximum at run time.

Two computations of the same quantized product, chosen by ``compute``:

* ``int8``: ``torch._int_mm`` (int8 x int8 -> exact int32 accumulation), then the per-row x per-column
  float scales. On this project's CPUs (oneDNN, AVX-512 VNNI) it is several times faster than the float
  matmul of the same shape (benchmarks/RESULTS.md, "W8A8"); on CUDA it needs at least 17 rows and
  sizes that are multiples of 8, so smaller calls are padded and odd sizes use ``dequant``.
* ``dequant``: dequantize both operands to floats and use an ordinary matmul: the test oracle and the
  fallback on devices without an int8 kernel. It is the same math; only float rounding differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

QMAX_W = 127          # symmetric weight range [-127, 127]
QMIN_A, QMAX_A = -128, 127
COMPUTES = ("auto", "int8", "dequant")
_TINY = 1e-8           # scale floor: an all-zero channel or row gets a harmless nonzero scale


def compute_dtype(x: Tensor) -> torch.dtype:
    """Float dtype the quantized arithmetic runs in: float64 for float64 inputs (tests), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def quantize_weight(w_OI: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 of ``w [..., O, I]``: ``(q int8 [..., O, I], scale float32 [..., O])``.

    ``scale = max|w_o| / 127``, ``q = round(w / scale)``; the dequantized ``q * scale`` is within
    ``scale / 2`` of ``w`` everywhere and exact at each row's maximum.
    """
    w = w_OI.detach().to(torch.float64)
    scale = (w.abs().amax(-1) / QMAX_W).clamp(min=_TINY)
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX_W, QMAX_W).to(torch.int8)
    return q, scale.to(torch.float32)


def static_input_scale(absmax: Tensor) -> Tensor:
    """The per-tensor static activation scale ``max|x| / 127`` from calibrated absolute maxima (any shape
    whose last dim is the channel): one value per leading index, float32."""
    return (absmax.to(torch.float32).amax(-1) / QMAX_A).clamp(min=_TINY)


def quantize_input(x_RI: Tensor, scale: Tensor | None, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Activation int8 of ``x [R, I]``: ``(q int8 [R, I], scale [R, 1])`` in :func:`compute_dtype`.

    ``scale`` None is dynamic (per row, ``max|x_r| / 127``); else a static per-tensor scale (one element)
    with an optional integer zero point ``offset``: ``q = clamp(round(x / scale) + offset, -128, 127)``,
    as Ascend's quantize op computes it. Values beyond the calibrated range saturate.
    """
    f = compute_dtype(x_RI)
    x = x_RI.to(f)
    if scale is None:
        s_R1 = (x.abs().amax(-1, keepdim=True) / QMAX_A).clamp(min=_TINY)
    else:
        s_R1 = scale.to(f).reshape(1, 1)
    q = torch.div(x, s_R1).round_()  # in place from here on: decode calls are small, allocations count
    if offset is not None:
        q.add_(offset.to(f).reshape(1, 1))
    return q.clamp_(QMIN_A, QMAX_A).to(torch.int8), s_R1.expand(x.shape[0], 1)


def _int_mm_ok(xq_RI: Tensor, wq_OI: Tensor) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    if xq_RI.device.type == "cpu":
        return True
    if xq_RI.device.type == "cuda":  # cuBLASLt int8: k and n multiples of 8 (rows are padded to > 16)
        return xq_RI.shape[1] % 8 == 0 and wq_OI.shape[0] % 8 == 0
    return False


def int8_available(device: torch.device | str) -> bool:
    """Whether ``compute="auto"`` runs real int8 matmuls on ``device`` (CPU and CUDA with ``torch._int_mm``)."""
    return hasattr(torch, "_int_mm") and torch.device(device).type in ("cpu", "cuda")


def int_mm(xq_RI: Tensor, wq_OI: Tensor) -> Tensor:
    """Exact ``xq @ wq.T`` in int32 through ``torch._int_mm``; on CUDA pads to the 17 rows it needs."""
    r = xq_RI.shape[0]
    if xq_RI.device.type == "cuda" and r <= 16:
        pad = xq_RI.new_zeros(32, xq_RI.shape[1])
        pad[:r] = xq_RI
        return torch._int_mm(pad, wq_OI.t())[:r]
    return torch._int_mm(xq_RI, wq_OI.t())


def int8_matmul(xq_RI: Tensor, scale_R1: Tensor, wq_OI: Tensor, col_scale_O: Tensor, compute: str,
                offset: Tensor | None = None, col_bias_O: Tensor | None = None) -> Tensor:
    """``y [R, O]`` of the quantized product, in ``scale_R1.dtype``: row ``r``, column ``o`` is
    ``(sum_i xq[r,i] wq[o,i] + col_bias[o]) * scale_R1[r] * col_scale[o]``.

    ``scale_R1`` is the activation scale (static: the one per-tensor value on every row; dynamic: each
    row's own), ``col_scale`` the weight scale, ``col_bias`` the int32 Ascend ``quant_bias`` (it also
    carries the zero-point correction ``-offset * sum_i wq[o,i]``). ``int8`` accumulates exactly in int32;
    ``dequant`` computes ``((xq - offset) * scale) @ (wq * col_scale).T`` plus the float bias that
    ``col_bias`` stands for: the same value up to float rounding.
    """
    f = scale_R1.dtype
    if compute == "int8" and _int_mm_ok(xq_RI, wq_OI):
        acc = int_mm(xq_RI, wq_OI)
        if col_bias_O is not None:
            acc.add_(col_bias_O)
        return acc.to(f).mul_(scale_R1).mul_(col_scale_O.to(f))
    # dequantize oracle: float operands, ordinary matmul
    x = xq_RI.to(f)
    if offset is not None:
        x = x - offset.to(f).reshape(1, 1)
    w = wq_OI.to(f) * col_scale_O.to(f).unsqueeze(-1)
    y = (x * scale_R1) @ w.t()
    if col_bias_O is not None or offset is not None:
        # the float bias the int32 one stands for: (quant_bias + offset * sum_i wq) * scale * col_scale
        b = col_bias_O.to(f) if col_bias_O is not None else torch.zeros_like(w[:, 0])
        if offset is not None:
            b = b + offset.to(f) * wq_OI.to(f).sum(-1)
        y = y + b * (scale_R1 * col_scale_O.to(f))
    return y
