"""The stacked-experts modules: float SwiGLU experts behind a registered backend (the weight-kind seam),
and the dense SwiGLU MLP (shared expert, dense layers).

Shape legend: T tokens, H hidden, N experts, F expert intermediate, K experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .auto import get_experts_backend
from .choice import KernelChoices
from .linear import Linear


def _local(w):
    """This rank's expert block of an expert-parallel DTensor weight (``Shard(0)`` over the ep ranks;
    differentiable), or the weight itself. Duck-typed on ``to_local``: importing
    ``torch.distributed.tensor`` here would add half a second to every ``import moge``."""
    return w.to_local() if hasattr(w, "to_local") else w


class StackedExperts(nn.Module):
    """N SwiGLU experts whose ``gate_up_proj [N,2F,H]`` / ``down_proj [N,H,F]`` weights are of one kind
    (float here, int8 in :class:`moge.quant.QuantizedExperts`), computed by a registered backend: the
    weight-kind seam. Subclasses only create the two weights."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        get_experts_backend(backend)  # fail early on a bad name
        self.backend = backend

    # The model's measured kernel choices (moge.experts.choice.use_kernels sets it); None: no measuring.
    takes_kernels = True
    kernels: KernelChoices | None = None

    def forward(self, x_TH: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        fn = get_experts_backend(backend or self.backend, x_TH.device)
        return fn(x_TH, expert_ids_TK, weights_TK, _local(self.gate_up_proj), _local(self.down_proj),
                  kernels=self.kernels)

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
