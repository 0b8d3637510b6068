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

So the kernel is **chosen by measurement, on the real calls**: the first calls of each (weight shape,
rows, bias, threads) alternate between the two kernels, each timed, :data:`TUNE_REPEATS` per kernel;
then the one with the best time is kept for the rest of the process (:func:`few_rows_kernel`), so
results are repeatable within a process after those first calls. Timing the real calls matters: a
decode step streams far more weights than the CPU caches hold, and a kernel timed repeatedly on one
weight (hot in cache) can win there and lose on the cold weight of a real step. The AMD VM chose
``F.linear`` that way: the ``small`` model's experts run 1.9x slower with it than with ``W @ x^T``
(``benchmarks/bench_decode_experts.py``). The trial calls are the real calls: nothing is computed
twice, only the slower kernel runs a few times (:class:`MeasuredChoice`). ``MOGE_FEW_ROWS_KERNEL``
(``linear`` or ``wxt``) or :func:`set_few_rows_kernel` fixes the choice instead.

:class:`Linear` is an ``nn.Linear`` (same parameters, names and init) whose forward takes the chosen
kernel on CPU for float32 inputs of at most :data:`FEW_ROWS` rows **under** ``torch.inference_mode()``
(which :func:`moge.generate.generate` and :mod:`moge.engine` run in), and plain ``F.linear``
everywhere else (CUDA, bf16, prefill and training sizes, ``no_grad`` forwards). Why only there: the
``W @ x^T`` kernel's last bits depend on the weight's memory alignment and on the number of rows (MKL
picks its inner loop by both), so a checkpoint loaded by memory map, or a token in another batch,
could differ from the same computation elsewhere by an ulp. ``F.linear`` here does not, and plain
forwards keep that reproducibility; decoding trades it for speed (results agree to float32 rounding).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FEW_ROWS", "Linear", "MeasuredChoice", "few_rows_kernel", "few_rows_linear", "linear",
           "set_few_rows_kernel", "timed_trial"]

# Above this many rows F.linear is as fast or faster (and prefill/training never come near it).
FEW_ROWS = 64
# Timed real calls per kernel when a key is first seen (the best of them counts).
TUNE_REPEATS = 3
KERNELS = ("linear", "wxt")

_forced: str | None = None


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


_KERNEL_FNS = {"linear": _f_linear, "wxt": _wxt}


def set_few_rows_kernel(name: str | None) -> None:
    """Fix the few-rows kernel (``"linear"``: ``F.linear``; ``"wxt"``: ``(W @ x^T)^T``), or with
    ``None`` / ``"auto"`` go back to choosing by measurement. Clears the choices made so far."""
    global _forced
    if name not in (None, "auto", *KERNELS):
        raise ValueError(f"few-rows kernel must be one of {['auto', *KERNELS]}, got {name!r}")
    _forced = None if name in (None, "auto") else name
    _choice.clear()


def _key(rows: int, weight_OI: Tensor, bias_O: Tensor | None) -> tuple:
    return tuple(weight_OI.shape), rows, bias_O is not None, torch.get_num_threads()


def few_rows_kernel(rows: int, weight_OI: Tensor, bias_O: Tensor | None = None) -> str | None:
    """The kernel (``"linear"`` or ``"wxt"``) used for ``rows`` rows times ``weight``: fixed by
    :func:`set_few_rows_kernel` or the environment, else the one measured fastest on this key's first
    calls; None while those calls are still being timed."""
    return _forced or _choice.get(_key(rows, weight_OI, bias_O))


def timed_trial(trials: dict[str, list], candidates: Mapping[str, Callable[[], object]],
                repeats: int = TUNE_REPEATS) -> tuple[object, str | None]:
    """Run the candidate tried least so far (``trials``: name -> ``[best time, calls]``, updated in
    place) and time it; returns ``(its result, the winner)``, the winner being None until every
    candidate has been timed ``repeats`` times. Measuring on real calls sees the caches as they are."""
    name = min(candidates, key=lambda c: trials.setdefault(c, [float("inf"), 0])[1])
    t0 = time.perf_counter()
    out = candidates[name]()
    dt = time.perf_counter() - t0
    rec = trials[name]
    rec[0], rec[1] = min(rec[0], dt), rec[1] + 1
    done = all(trials[c][1] >= repeats for c in candidates)
    return out, (min(candidates, key=lambda c: trials[c][0]) if done else None)


class MeasuredChoice:
    """Per-key choices among interchangeable candidates, each made by :func:`timed_trial` on the key's
    first real calls and then kept (for the process: the few-rows kernel here, the decode experts
    backend in :mod:`moge.experts_gemv`)."""

    def __init__(self) -> None:
        self._chosen: dict[tuple, str] = {}
        self._trials: dict[tuple, dict[str, list]] = {}  # key -> name -> [best time, calls], until chosen

    def get(self, key: tuple) -> str | None:
        """The candidate chosen for ``key``, or None while it is still being measured."""
        return self._chosen.get(key)

    def measure(self, key: tuple, candidates: Mapping[str, Callable[[], object]]) -> object:
        """One timed trial call for ``key`` (its real result); keeps the winner once every candidate
        has been timed :data:`TUNE_REPEATS` times."""
        y, winner = timed_trial(self._trials.setdefault(key, {}), candidates)
        if winner is not None:
            self._chosen[key] = winner
            del self._trials[key]
        return y

    def clear(self) -> None:
        self._chosen.clear()
        self._trials.clear()


_choice = MeasuredChoice()


def few_rows_linear(x_RI: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``F.linear`` of 2-D ``x [R, I]`` through the chosen few-rows kernel for float32 on a CPU with
    ``0 < R <= FEW_ROWS`` (whether or not in inference mode: callers decide when), else ``F.linear``."""
    rows = x_RI.shape[0]
    if not (0 < rows <= FEW_ROWS and x_RI.device.type == "cpu" and x_RI.dtype == torch.float32 == weight_OI.dtype):
        return F.linear(x_RI, weight_OI, bias_O)
    name = few_rows_kernel(rows, weight_OI, bias_O)
    if name is not None:
        return _KERNEL_FNS[name](x_RI, weight_OI, bias_O)
    return _choice.measure(_key(rows, weight_OI, bias_O),
                           {k: (lambda f=_KERNEL_FNS[k]: f(x_RI, weight_OI, bias_O)) for k in KERNELS})


def linear(x: Tensor, weight_OI: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x [..., I]``, through the chosen few-rows kernel on CPU for
    at most ``FEW_ROWS`` float32 rows under ``torch.inference_mode()``."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (0 < rows <= FEW_ROWS and x.device.type == "cpu" and x.dtype == torch.float32 == weight_OI.dtype
            and torch.is_inference_mode_enabled()):
        return F.linear(x, weight_OI, bias_O)
    y_RO = few_rows_linear(x.reshape(rows, x.shape[-1]), weight_OI, bias_O)
    return y_RO.view(*x.shape[:-1], weight_OI.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (the fast path for few rows on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


set_few_rows_kernel(os.environ.get("MOGE_FEW_ROWS_KERNEL") or None)
