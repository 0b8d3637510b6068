"""SwiGLU experts stored as stacked 3-D parameters, with compute backends registered by name.

Shape legend
    T  tokens        H  hidden size       N  routed experts       F  expert intermediate size
    K  experts per token (selected ids / weights are [T, K])      P  token-expert pairs (T*K)

Parameters: ``gate_up_proj [N, 2F, H]`` (rows 0..F-1 are the gate projection, F..2F-1 the up
projection, each stored ``[out, in]`` like ``nn.Linear``) and ``down_proj [N, H, F]``.

A backend is a function ``(x [T,H], expert_ids [T,K], weights [T,K], gate_up [N,2F,H], down [N,H,F])
-> y [T,H]`` computing ``y_t = sum_k weights[t,k] * Expert_{ids[t,k]}(x_t)``. ``eager`` is the plain
per-expert loop and the test oracle; faster backends must match it and are chosen by name.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ExpertsBackend = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

_BACKENDS: dict[str, ExpertsBackend] = {}


def register_experts_backend(name: str) -> Callable[[ExpertsBackend], ExpertsBackend]:
    """Decorator registering an experts backend under ``name`` (see the module docstring for the signature)."""
    def deco(fn: ExpertsBackend) -> ExpertsBackend:
        _BACKENDS[name] = fn
        return fn
    return deco


def available_backends() -> list[str]:
    """Names accepted by :func:`get_experts_backend` (plus ``auto``)."""
    return sorted(_BACKENDS)


def get_experts_backend(name: str, device: torch.device | None = None) -> ExpertsBackend:
    """The backend called ``name``; ``auto`` picks the fastest one for ``device``."""
    if name == "auto":
        name = default_backend(device)
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown experts backend {name!r}; available: {['auto', *available_backends()]}") from None


def default_backend(device: torch.device | None = None) -> str:
    """The backend ``auto`` resolves to on ``device``."""
    return "grouped_mm" if "grouped_mm" in _BACKENDS else "eager"


def _swiglu(h_P2F: Tensor) -> Tensor:
    gate_PF, up_PF = h_P2F.chunk(2, dim=-1)
    return F.silu(gate_PF) * up_PF


@register_experts_backend("eager")
def eager_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Tensor, down_NHF: Tensor) -> Tensor:
    """Reference: loop over experts, gather each one's tokens, run its MLP, scatter-add the result."""
    y_TH = torch.zeros_like(x_TH)
    for e in range(gate_up_N2FH.shape[0]):
        tok_P, slot_P = torch.where(ids_TK == e)
        if tok_P.numel() == 0:
            continue
        h_PF = _swiglu(F.linear(x_TH[tok_P], gate_up_N2FH[e]))
        out_PH = F.linear(h_PF, down_NHF[e]) * w_TK[tok_P, slot_P].unsqueeze(-1).to(x_TH.dtype)
        y_TH = y_TH.index_add(0, tok_P, out_PH)
    return y_TH


def sort_by_expert(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Permutation grouping token-expert pairs by expert, without a host sync.

    Returns ``(order_P, token_P, offsets_N)``: ``order_P`` indexes the flattened ``[T*K]`` pairs so
    that equal experts are contiguous (stable, so tokens stay in order), ``token_P`` is the token
    of each sorted pair, and ``offsets_N`` the int32 cumulative pair counts (end of each expert's rows).
    """
    flat_P = ids_TK.reshape(-1)
    order_P = torch.argsort(flat_P, stable=True)
    token_P = order_P // ids_TK.shape[1]
    offsets_N = torch.cumsum(torch.bincount(flat_P, minlength=num_experts), 0).to(torch.int32)
    return order_P, token_P, offsets_N


@register_experts_backend("grouped_mm")
def grouped_mm_experts(x_TH: Tensor, ids_TK: Tensor, w_TK: Tensor, gate_up_N2FH: Tensor, down_NHF: Tensor) -> Tensor:
    """Sort pairs by expert, two grouped matmuls, weighted scatter-add: no Python loop, no host sync."""
    order_P, token_P, offsets_N = sort_by_expert(ids_TK, gate_up_N2FH.shape[0])
    xs_PH = x_TH[token_P]
    h_PF = _swiglu(F.grouped_mm(xs_PH, gate_up_N2FH.transpose(1, 2), offs=offsets_N))
    out_PH = F.grouped_mm(h_PF, down_NHF.transpose(1, 2), offs=offsets_N)
    out_PH = out_PH * w_TK.reshape(-1)[order_P].unsqueeze(-1).to(out_PH.dtype)
    return torch.zeros_like(x_TH).index_add(0, token_P, out_PH)


class SwiGLUExperts(nn.Module):
    """N SwiGLU experts ``down(silu(gate(x)) * up(x))`` (no biases) as stacked parameters."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        get_experts_backend(backend)  # fail early on a bad name
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal init; the default std matches ``nn.Linear``'s scale for each projection."""
        if self.gate_up_proj.is_meta:
            return
        with torch.no_grad():
            self.gate_up_proj.normal_(0.0, std if std is not None else 1 / math.sqrt(self.hidden_size))
            self.down_proj.normal_(0.0, std if std is not None else 1 / math.sqrt(self.intermediate_size))

    def forward(self, x_TH: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        fn = get_experts_backend(backend or self.backend, x_TH.device)
        return fn(x_TH, expert_ids_TK, weights_TK, self.gate_up_proj, self.down_proj)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, backend={self.backend!r}")


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared expert, and dense layers): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
