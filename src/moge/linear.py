"""Linear layers at decode sizes: the same math as ``F.linear``, a faster CPU kernel for few rows.

Shape legend
    R  rows (all leading dims of the input flattened)     I  input features     O  output features

At decode a linear layer multiplies a handful of rows by a weight that is read from memory once, so
its speed is the speed of streaming the weight. On x86 CPUs with MKL (torch's CPU wheels),
``F.linear(x, W) = x @ W^T`` with 1-64 rows takes a path that runs far below memory bandwidth; the
same product computed as ``(W @ x^T)^T`` reaches 2-4x its speed with rows padded to an even count
(one row runs single-threaded otherwise). Measured on the 2-core development VM, float32, 2 threads,
weights not in cache (GB/s of weight read; benchmarks/RESULTS.md has the method):

=============  ========  ====================  ==========  ====================
weight [O,I]   rows      ``F.linear``          rows        ``(W @ x^T)^T``
=============  ========  ====================  ==========  ====================
512 x 768      1         7.9                   1 (pad 2)   18.2
768 x 256      2         3.2                   2           14.4
32000 x 768    4         4.9                   4           15.7
=============  ========  ====================  ==========  ====================

:class:`Linear` is an ``nn.Linear`` (same parameters, names and init) whose forward takes that path
on CPU for float32 inputs of at most :data:`FEW_ROWS` rows **under** ``torch.inference_mode()``
(which :func:`moge.generate.generate` and :mod:`moge.engine` run in), and plain ``F.linear``
everywhere else (CUDA, bf16, prefill and training sizes, ``no_grad`` forwards). Why only there: the
fast kernel's last bits depend on the weight's memory alignment and on the number of rows (MKL picks
its inner loop by both), so a checkpoint loaded by memory map, or a token in another batch, could
differ from the same computation elsewhere by an ulp. ``F.linear`` here does not, and plain forwards
keep that reproducibility; decoding trades it for speed (results agree to float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FEW_ROWS", "Linear", "linear"]

# Above this many rows F.linear is as fast or faster (and prefill/training never come near it).
FEW_ROWS = 64


def linear(x: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x [..., I]``, through ``(W @ x^T)^T`` on CPU for few float32 rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (0 < rows <= FEW_ROWS and x.device.type == "cpu" and x.dtype == torch.float32 == weight_OI.dtype
            and torch.is_inference_mode_enabled()):
        return F.linear(x, weight_OI, bias_O)
    x_RI = x.reshape(rows, x.shape[-1])
    # MKL runs a single row on one thread (a duplicated row costs nothing at this size), and it is
    # 1.5x faster when x^T is a transposed view of row-major rows than when it is contiguous.
    x_RI = torch.cat([x_RI, x_RI[-1:]]) if rows % 2 else x_RI.contiguous()
    y_OR = torch.mm(weight_OI, x_RI.t()) if bias_O is None else torch.addmm(bias_O.unsqueeze(1), weight_OI, x_RI.t())
    # Row-major like F.linear's result: SDPA's fast CPU kernel needs the head dim contiguous.
    return y_OR.t()[:rows].contiguous().view(*x.shape[:-1], weight_OI.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (the fast path for few rows on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
