"""Linear layers at decode sizes: the same math as ``F.linear``, the faster of two CPU kernels for few rows.

Shape legend
    R  rows (all leading dims of the input flattened)     I  input features     O  output features

At decode a linear layer multiplies a handful of rows by a weight that is read from memory once, so
its speed is the speed of streaming the weight. For 1-64 float32 rows on a CPU, MKL's two ways of
computing the product stream the weight at rates that differ by 2-4x, and **which one is faster
depends on the CPU**: ``F.linear(x, W) = x @ W^T`` or the same product as ``(W @ x^T)^T`` with rows
padded to an even count (MKL runs a one-column product single-threaded). Measured, float32, 2
threads, weights not in cache (GB/s of weight read):

==============  =====  ======================  ======================  ==========================
weight [O,I]    rows   AMD EPYC (2-core VM):   ``(W @ x^T)^T``         Intel Xeon (2-core VM):
                       ``F.linear``                                    ``F.linear`` / ``W @ x^T``
==============  =====  ======================  ======================  ==========================
512 x 768       1      7.9                     18.2                    16.5 / 7.7
768 x 256       2      3.2                     14.4                    14.3 / 7.5
32000 x 768     4      4.9                     15.7                    10.1 / 9.1
32000 x 768     8      -                       -                       6.1 / 7.7
==============  =====  ======================  ======================  ==========================

So the kernel is **chosen by measurement, on the real calls** of each (weight shape, rows, bias,
threads) key, by the model's :class:`~moge.experts.choice.KernelChoices` (``model.kernels``; see
:mod:`moge.experts.choice`), so results are repeatable for a model after those first calls. A weight
timed repeatedly while hot in cache can mislead: the AMD VM once chose ``F.linear`` that way, and the
``small`` model's experts ran 1.9x slower with it than with ``W @ x^T``
(``benchmarks/bench_decode_experts.py``). ``model.kernels.pin("few_rows", "wxt")`` fixes the choice.

:class:`Linear` is an ``nn.Linear`` (same parameters, names and init) whose forward takes the chosen
kernel on CPU for float32 inputs of at most :data:`FEW_ROWS` rows **under** ``torch.inference_mode()``
when it has a ``KernelChoices``
(which :func:`moge.generate.generate` and :mod:`moge.engine` run in), and plain ``F.linear``
everywhere else (CUDA, bf16, prefill and training sizes, ``no_grad`` forwards). Why only there: the
``W @ x^T`` kernel's last bits depend on the weight's memory alignment and on the number of rows (MKL
picks its inner loop by both), so a checkpoint loaded by memory map, or a token in another batch,
could differ from the same computation elsewhere by an ulp. ``F.linear`` here does not, and plain
forwards keep that reproducibility; decoding trades it for speed (results agree to float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choice import KernelChoices
from .reduce import reduce_linear


__all__ = ["FEW_ROWS", "KERNELS", "Linear", "few_rows_linear", "linear"]

# Above this many rows F.linear is as fast or faster (and prefill/training never come near it).
FEW_ROWS = 64


def _f_linear(x_RI: Tensor, weight_OI: Tensor, bias_O: Tensor | None) -> Tensor:
    return F.linear(x_RI, weight_OI, bias_O)


def _wxt(x_RI: Tensor, weight_OI: Tensor, bias_O: Tensor | None) -> Tensor:
    rows = x_RI.shape[0]
    # MKL runs a single column on one thread (a duplicated row costs nothing at this size), and it is
    # 1.5x faster when x^T is a transposed view of row-major rows than when it is contiguous.
    x_RI = torch.cat([x_RI, x_RI[-1:]]) if rows % 2 else x_RI.contiguous()
    y_OR = torch.mm(weight_OI, x_RI.t()) if bias_O is None else torch.addmm(bias_O.unsqueeze(1), weight_OI, x_RI.t())
    # Row-major like F.linear's result: SDPA's fast CPU kernel needs the head dim contiguous.
    return y_OR.t()[:rows].contiguous()


KERNELS = {"linear": _f_linear, "wxt": _wxt}


def few_rows_key(rows: int, weight_OI: Tensor, bias_O: Tensor | None) -> str:
    """The key a few-rows kernel is chosen for: weight shape, rows, bias, threads."""
    return f"{tuple(weight_OI.shape)}|rows={rows}|bias={bias_O is not None}|threads={torch.get_num_threads()}"


def few_rows_linear(x_RI: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None,
                    kernels: KernelChoices | None = None) -> Tensor:
    """``F.linear`` of 2-D ``x [R, I]`` through ``kernels``' few-rows kernel for float32 on a CPU with
    ``0 < R <= FEW_ROWS`` (whether or not in inference mode: callers decide when), else ``F.linear``."""
    rows = x_RI.shape[0]
    if kernels is None or not (0 < rows <= FEW_ROWS and x_RI.device.type == "cpu"
                               and x_RI.dtype == torch.float32 == weight_OI.dtype):
        return F.linear(x_RI, weight_OI, bias_O)
    key = few_rows_key(rows, weight_OI, bias_O)
    name = kernels.get("few_rows", key)
    if name is not None:  # the decode hot path: no trial bookkeeping once the choice is made
        return KERNELS[name](x_RI, weight_OI, bias_O)
    return kernels.run("few_rows", key, {k: (lambda f=f: f(x_RI, weight_OI, bias_O)) for k, f in KERNELS.items()})


def linear(x: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None, kernels: KernelChoices | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x [..., I]``, through the chosen few-rows kernel on CPU for
    at most ``FEW_ROWS`` float32 rows under ``torch.inference_mode()``; one row on CPU while
    ``torch.compile`` traces (a compiled decode step), in :func:`~moge.experts.reduce.reduce_linear`'s
    form."""
    rows = x.numel() // max(x.shape[-1], 1)
    if torch.compiler.is_compiling():
        if rows == 1 and x.device.type == "cpu" and not torch.is_grad_enabled():
            # A compiled CPU decode step: the reduce form streams the weight at the memory's speed.
            return reduce_linear(x.reshape(1, x.shape[-1]), weight_OI, bias_O).view(*x.shape[:-1], weight_OI.shape[0])
        return F.linear(x, weight_OI, bias_O)  # the measured choice times calls: not inside a graph
    if kernels is None or not (0 < rows <= FEW_ROWS and x.device.type == "cpu"
                               and x.dtype == torch.float32 == weight_OI.dtype and torch.is_inference_mode_enabled()):
        return F.linear(x, weight_OI, bias_O)
    y_RO = few_rows_linear(x.reshape(rows, x.shape[-1]), weight_OI, bias_O, kernels)
    return y_RO.view(*x.shape[:-1], weight_OI.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (the fast path for few rows on CPU)."""

    # The owning model's measured kernel choices (set by moge.experts.choice.use_kernels).
    takes_kernels = True
    kernels: KernelChoices | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.kernels)
