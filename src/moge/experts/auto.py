"""``auto``: the experts backend chosen per call, and :func:`get_experts_backend`, the one way to get a
backend by name (``auto`` included).

Shape legend: T tokens, H hidden, N experts, F expert intermediate, K experts per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .choice import KernelChoices
from .gemv import decode_experts
from .reduce import reduce_experts
from .registry import ExpertsBackend, ExpertsBackendError, available_backends, lookup, reads_counts_on_host


# Average pairs per expert up to which ``gemv`` beats ``sorted`` on CPU (equal at 8, see RESULTS.md).
GEMV_MAX_ROWS = 8


def default_backend(device: torch.device | None = None, pairs_per_expert: float | None = None) -> str:
    """The backend ``auto`` resolves to on ``device`` for a call with ``pairs_per_expert`` rows per
    expert on average (None: prefill/training sizes).

    CUDA, ``torch.export`` and ``torch.compile`` without autograd get ``grouped_mm`` (no host sync,
    graph-capturable: a compiled inference graph must not break on routing data, e.g. transformers'
    full-graph compile; a compiled training step keeps ``sorted``, whose graph break costs less than
    ``grouped_mm``'s float32 fallback on CPU). On a CPU the one
    host sync of a per-expert loop is free: ``gemv`` at decode sizes, ``sorted`` (plain GEMMs with a
    hand-written backward, it beat ``grouped_mm`` there, see benchmarks/RESULTS.md) otherwise. ``auto``
    passes ``pairs_per_expert`` only under ``torch.inference_mode()`` (see :mod:`moge.experts.linear` for why).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # Under torch.export / torch.compile the graph must not depend on routing data: grouped_mm keeps the
    # counts on the device (every shape is T*K pairs, whatever the router chose).
    graph = torch.compiler.is_exporting() or (torch.compiler.is_compiling() and not torch.is_grad_enabled())
    if (dev.type == "cuda" or graph) and "grouped_mm" in available_backends():
        return "grouped_mm"
    if pairs_per_expert is not None and pairs_per_expert <= GEMV_MAX_ROWS:
        return "gemv"
    return "sorted" if "sorted" in available_backends() else "eager"


def _auto_cpu(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Any, down_NHF: Any,
              kernels: KernelChoices | None = None) -> Tensor:
    decode_sized = ids_TK.numel() <= GEMV_MAX_ROWS * gate_up_N2FH.shape[0]
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and decode_sized:
        # A compiled decode step: one graph, the touched experts read in place (moge.experts.reduce).
        return reduce_experts(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)
    # gemv's products round by memory alignment and row count (see moge.experts.linear): decoding only.
    rows = (ids_TK.numel() / gate_up_N2FH.shape[0]
            if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled() else None)
    name = default_backend("cpu", rows)
    if name == "gemv":  # decode sizes: gemv or grouped_mm, whichever this CPU runs faster (measured)
        return decode_experts(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF, kernels)
    return lookup(name)(x_TH, ids_TK, w_TK, gate_up_N2FH, down_NHF)


def get_experts_backend(name: str, device: torch.device | None = None) -> ExpertsBackend:
    """The backend called ``name``; ``auto`` picks the fastest one for ``device`` and each call's sizes."""
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu" and not torch.compiler.is_exporting():
            return _auto_cpu
        name = default_backend(dev)
    fn = lookup(name)
    if reads_counts_on_host(name) and torch.compiler.is_exporting():
        raise ExpertsBackendError(f"experts backend {name!r} reads per-expert counts on the host, which "
                                  f"torch.export cannot trace; use 'grouped_mm' or 'auto'")
    return fn
