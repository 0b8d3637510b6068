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
* ``sorted`` (in :mod:`moge.experts_sorted`): per-expert GEMMs on contiguous sorted segments with a
  hand-written backward; one host sync for the counts; the fastest on CPU at prefill and training
  sizes (see benchmarks/RESULTS.md).
* ``gemv`` (in :mod:`moge.experts_gemv`): decode sizes on CPU (a few rows per expert): each touched
  expert's two products through the measured-fastest few-rows kernel of :mod:`moge.linear`, and
  nothing else per expert; one host sync for the counts; differentiable through autograd.

``auto`` resolves per call (:func:`default_backend`): ``grouped_mm`` on CUDA and under ``torch.export``;
on CPU under ``torch.inference_mode()`` (decoding) at up to :data:`GEMV_MAX_ROWS` pairs per expert on
average, ``gemv`` or ``grouped_mm``, whichever measured faster on the first real calls of that shape
(:func:`moge.experts_gemv.decode_experts`: the order flips between CPUs), else ``sorted``.

Quantized weights are inference-only (no backward). ``grouped_mm`` and ``gemv`` have no int8 kernel to
call, so with quantized weights they run the ``sorted`` loop (one host sync).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .errors import InvalidArgumentError
from .linear import Linear
from .routing import expert_counts

ExpertsBackend = Callable[[Tensor, Tensor, Tensor, Any, Any], Tensor]

_BACKENDS: dict[str, ExpertsBackend] = {}
_HOST_SYNC: set[str] = set()  # backends that read data-dependent sizes on the host (not traceable by torch.export)


class ExpertsBackendError(InvalidArgumentError):
    """An experts backend that does not exist, or cannot run where it was asked to (e.g. under torch.export)."""


def register_experts_backend(name: str, host_sync: bool = False) -> Callable[[ExpertsBackend], ExpertsBackend]:
    """Decorator registering an experts backend under ``name`` (see the module docstring for the signature).

    ``host_sync=True`` marks a backend that reads data-dependent sizes on the host; ``auto`` never picks
    one under ``torch.export``, and naming one there is an error.
    """
    def deco(fn: ExpertsBackend) -> ExpertsBackend:
        _BACKENDS[name] = fn
        (_HOST_SYNC.add if host_sync else _HOST_SYNC.discard)(name)
        return fn
    return deco


def available_backends() -> list[str]:
    """Names accepted by :func:`get_experts_backend` (plus ``auto``)."""
    return sorted(_BACKENDS)


def get_experts_backend(name: str, device: torch.device | None = None) -> ExpertsBackend:
    """The backend called ``name``; ``auto`` picks the fastest one for ``device`` and each call's sizes."""
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu" and not torch.compiler.is_exporting():
            return _auto_cpu
        name = default_backend(dev)
    if name not in _BACKENDS:
        raise ExpertsBackendError(f"unknown experts backend {name!r}; available: {['auto', *available_backends()]}")
    if name in _HOST_SYNC and torch.compiler.is_exporting():
        raise ExpertsBackendError(f"experts backend {name!r} reads per-expert counts on the host, which "
                                  f"torch.export cannot trace; use 'grouped_mm' or 'auto'")
    return _BACKENDS[name]


# Average pairs per expert up to which ``gemv`` beats ``sorted`` on CPU (equal at 8, see RESULTS.md).
GEMV_MAX_ROWS = 8


def default_backend(device: torch.device | None = None, pairs_per_expert: float | None = None) -> str:
    """The backend ``auto`` resolves to on ``device`` for a call with ``pairs_per_expert`` rows per
    expert on average (None: prefill/training sizes).

    CUDA and ``torch.export`` get ``grouped_mm`` (no host sync, graph-capturable). On a CPU the one
    host sync of a per-expert loop is free: ``gemv`` at decode sizes, ``sorted`` (plain GEMMs with a
    hand-written backward, it beat ``grouped_mm`` there, see benchmarks/RESULTS.md) otherwise. ``auto``
    passes ``pairs_per_expert`` only under ``torch.inference_mode()`` (see :mod:`moge.linear` for why).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # Under torch.export the graph must not depend on routing data: grouped_mm keeps the counts on the
    # device (every shape is T*K pairs, whatever the router chose).
    if (dev.type == "cuda" or torch.compiler.is_exporting()) and "grouped_mm" in _BACKENDS:
        return "grouped_mm"
    if pairs_per_expert is not None and pairs_per_expert <= GEMV_MAX_ROWS:
        return "gemv"
    return "sorted" if "sorted" in _BACKENDS else "eager"


def _auto_cpu(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any) -> Tensor:
    # gemv's products round by memory alignment and row count (see moge.linear): decoding only.
    rows = ids_TK.numel() / gate_up_N2FH.shape[0] if torch.is_inference_mode_enabled() else None
    name = default_backend("cpu", rows)
    if name == "gemv":  # decode sizes: gemv or grouped_mm, whichever this CPU runs faster (measured)
        return decode_experts(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)
    return _BACKENDS[name](x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)


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


def _swiglu(h_P2F: Tensor) -> Tensor:
    gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
    return F.silu(gate_PF) * up_PF


@register_experts_backend("eager", host_sync=True)
def eager_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any) -> Tensor:
    """Reference: loop over experts, gather each one's tokens, run its MLP, scatter-add the result."""
    y_TH = torch.zeros_like(x_TH)
    for e in range(gate_up_N2FH.shape[0]):
        tok_P, slot_P = torch.where(ids_TK == e)
        if tok_P.numel() == 0:
            continue
        h_PF = _swiglu(expert_linear(x_TH[tok_P], gate_up_N2FH, e))
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
    correctness fallback, not a fast path.
    """
    row_bytes = (x_PI.shape[-1] * x_PI.element_size(), w_NOI.shape[1] * x_PI.element_size())
    dtypes = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32, torch.bfloat16)
    if (x_PI.dtype in dtypes and hasattr(F, "grouped_mm")
            and all(b % 16 == 0 for b in row_bytes)):  # the kernel needs 16-byte aligned row strides
        return _ContiguousGrad.apply(F.grouped_mm(x_PI, w_NOI.transpose(1, 2), offs=offsets_N))
    return torch.bmm(w_NOI[expert_P], x_PI.unsqueeze(-1)).squeeze(-1)


@register_experts_backend("grouped_mm")
def grouped_mm_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any) -> Tensor:
    """Sort pairs by expert, two grouped matmuls, un-permute and sum the K slots: no loop, no host sync.

    The gate weight is applied to the ``[P, F]`` activation before the down projection (the
    projection is linear, so this is exact) because that tensor is H/F times smaller than the output.
    The K outputs of a token are combined by an inverse-permutation gather and a ``[T, K, H]`` sum
    instead of zeros + index_add: deterministic and one pass over memory. Quantized weights go through
    the ``sorted`` loop (there is no grouped int8 matmul to call).
    """
    if not (is_float_weight(gate_up_N2FH) and is_float_weight(down_NHF)):
        return _BACKENDS["sorted"](x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)  # moge.experts_sorted
    t, k = ids_TK.shape
    order_P, token_P, offsets_N = sort_by_expert(ids_TK, gate_up_N2FH.shape[0])
    expert_P = ids_TK.reshape(-1)[order_P]
    h_PF = _swiglu(_grouped_linear(x_TH[token_P], gate_up_N2FH, offsets_N, expert_P))
    h_PF = h_PF * w_TK.reshape(-1)[order_P].unsqueeze(-1).to(h_PF.dtype)
    out_PH = _grouped_linear(h_PF, down_NHF, offsets_N, expert_P)
    inv_P = torch.empty_like(order_P).scatter_(0, order_P, torch.arange(order_P.numel(), device=order_P.device))
    return out_PH[inv_P].view(t, k, out_PH.shape[-1]).sum(1)


def _local(w: Any) -> Any:
    """This rank's expert block of an expert-parallel DTensor weight (``Shard(0)`` over the ep ranks;
    differentiable), or the weight itself."""
    return w.to_local() if isinstance(w, DTensor) else w


class StackedExperts(nn.Module):
    """N SwiGLU experts whose ``gate_up_proj [N,2F,H]`` / ``down_proj [N,H,F]`` weights are of one kind
    (float here, int8 in :class:`moge.quant.QuantizedExperts`), computed by a registered backend: the
    weight-kind seam. Subclasses only create the two weights."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        get_experts_backend(backend)  # fail early on a bad name
        self.backend = backend

    def forward(self, x_TH: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        fn = get_experts_backend(backend or self.backend, x_TH.device)
        return fn(x_TH, expert_ids_TK, weights_TK, _local(self.gate_up_proj), _local(self.down_proj))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, backend={self.backend!r}")


class SwiGLUExperts(StackedExperts):
    """N SwiGLU experts ``down(silu(gate(x)) * up(x))`` (no biases) as stacked float parameters."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__(num_experts, hidden_size, intermediate_size, backend)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal init; the default std matches ``nn.Linear``'s scale for each projection."""
        if self.gate_up_proj.is_meta:
            return
        with torch.no_grad():
            self.gate_up_proj.normal_(0.0, std if std is not None else 1 / math.sqrt(self.hidden_size))
            self.down_proj.normal_(0.0, std if std is not None else 1 / math.sqrt(self.intermediate_size))


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared expert, and dense layers): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Two backends live in their own modules; importing them registers "sorted" and "gemv" (they import
# from here, so they come last).
from .experts_sorted import sorted_experts  # noqa: E402,F401 (registers ``sorted``)
from .experts_gemv import decode_experts, gemv_experts  # noqa: E402,F401
