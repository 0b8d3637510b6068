"""SwiGLU experts stored as stacked 3-D parameters, with compute backends registered by name.

Shape legend
    T  tokens        H  hidden size       N  routed experts       F  expert intermediate size
    K  experts per token (selected ids / weights are [T, K])      P  token-expert pairs (T*K)

Parameters: ``gate_up_proj [N, 2F, H]`` (rows 0..F-1 are the gate projection, F..2F-1 the up
projection, each stored ``[out, in]`` like ``nn.Linear``) and ``down_proj [N, H, F]``.

A backend is a function ``(x [T,H], expert_ids [T,K], weights [T,K], gate_up [N,2F,H], down [N,H,F])
-> y [T,H]`` computing ``y_t = sum_k weights[t,k] * Expert_{ids[t,k]}(x_t)``. ``eager`` is the plain
per-expert loop and the test oracle; faster backends must match it and are chosen by name.

The weights are of one of two kinds (the kind seam): float tensors ``[N, O, I]``, or quantized stacked
weights (:class:`moge.quant.Int8Linear` with a leading expert dimension), any object with ``shape`` and
``matmul(x_RI, e, row_scale_R1, out) -> [R, O]``. Backends reach an expert's matrix only through
:func:`expert_linear`, so every backend runs both kinds: a quantized weight quantizes its input rows and
multiplies in int8 (or through its dequantize oracle), and takes the rows' gate weights as an output
row scale so that its down projection sees the unweighted activation it was calibrated on.

* ``grouped_mm``: sort pairs by expert, two ``F.grouped_mm`` calls, no Python loop and no host sync
  of its own (the CUDA choice); float64 and odd sizes fall back to a gathered-weight ``bmm``.
* ``sorted`` (in :mod:`moge.experts.sorted`): per-expert GEMMs on contiguous sorted segments with a
  hand-written backward; one host sync for the counts; the fastest on CPU at prefill and training
  sizes (see benchmarks/RESULTS.md).
* ``gemv`` (in :mod:`moge.experts.gemv`): decode sizes on CPU (a few rows per expert): each touched
  expert's two products through the measured-fastest few-rows kernel of :mod:`moge.experts.linear`, and
  nothing else per expert; one host sync for the counts; differentiable through autograd.

* ``reduce`` (in :mod:`moge.experts.reduce`): each token-expert pair as a broadcast multiply and a sum
  over the expert's weights gathered in place; sync-free; only worth running compiled (a compiled CPU
  decode step, where Inductor turns it into a weight stream at the memory's speed).

``auto`` resolves per call (:func:`default_backend`): ``grouped_mm`` on CUDA and under ``torch.export``;
on CPU under ``torch.inference_mode()`` (decoding) at up to :data:`GEMV_MAX_ROWS` pairs per expert on
average, ``gemv`` or ``grouped_mm``, whichever measured faster on the first real calls of that shape
(:func:`moge.experts.gemv.decode_experts`: the order flips between CPUs), else ``sorted``; while
``torch.compile`` traces a CPU forward at those sizes, ``reduce``. The
measurements belong to the model: its :class:`~moge.experts.choice.KernelChoices` (``model.kernels``),
which can be pinned and saved; a module without one measures nothing.

Quantized weights are inference-only (no backward). ``grouped_mm`` and ``gemv`` have no int8 kernel to
call, so with quantized weights they run the ``sorted`` loop (one host sync).
"""

from .auto import GEMV_MAX_ROWS, default_backend, get_experts_backend
from .choice import KernelChoices, MeasuredChoice, use_kernels
from .eager import eager_experts, expert_linear, is_float_weight, sort_by_expert, sort_pairs
from .gemv import decode_experts, gemv_experts
from .grouped_mm import grouped_mm_experts
from .linear import Linear
from .modules import StackedExperts, SwiGLU, SwiGLUExperts
from .reduce import reduce_experts, reduce_linear
from .registry import ExpertsBackend, ExpertsBackendError, available_backends, register_experts_backend
from .sorted import sorted_experts


__all__ = ["GEMV_MAX_ROWS", "ExpertsBackend", "ExpertsBackendError", "KernelChoices", "Linear", "MeasuredChoice",
           "StackedExperts", "SwiGLU", "SwiGLUExperts", "available_backends", "decode_experts", "default_backend",
           "eager_experts", "expert_linear", "gemv_experts", "get_experts_backend", "grouped_mm_experts",
           "is_float_weight", "reduce_experts", "reduce_linear", "register_experts_backend", "sort_by_expert",
           "sort_pairs", "sorted_experts", "use_kernels"]
