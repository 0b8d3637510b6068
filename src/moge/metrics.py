"""Load-balance metrics (docs/design.md section 3): device loads, Imbalance Score, max/mean load, expert CV.

Shape legend: T tokens, K experts per token, N experts, D devices (each owning a contiguous block of
N/D experts; with one group per device, device g is group g).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validate as V
from .routing import expert_counts


def _check(num_experts: int, num_devices: int) -> None:
    V.integer("num_experts", num_experts, 1)
    V.integer("num_devices", num_devices, 1)
    if num_experts % num_devices:
        raise V.InvalidArgumentError(f"num_experts={num_experts} must be divisible by num_devices={num_devices} "
                         f"(devices own contiguous equal blocks of experts)")


def _check_ids(expert_ids_TK: Tensor) -> None:
    V.tensor("expert_ids", expert_ids_TK, "int", dims=2)


def device_loads(expert_ids_TK: Tensor, num_experts: int, num_devices: int) -> Tensor:
    """``T_i(X)``: token-expert pairs landing on each device, ``[D]`` int64."""
    _check(num_experts, num_devices)
    _check_ids(expert_ids_TK)
    counts_N = expert_counts(expert_ids_TK, num_experts)
    return device_loads_from_counts(counts_N, num_devices)


def device_loads_from_counts(expert_counts_N: Tensor, num_devices: int) -> Tensor:
    """Per-device loads from per-expert counts ``[N] -> [D]``."""
    V.tensor("expert_counts", expert_counts_N)
    _check(expert_counts_N.numel(), num_devices)
    return expert_counts_N.reshape(num_devices, -1).sum(-1)


def balance_from_counts(expert_counts_N: Tensor, num_devices: int, num_tokens: int) -> Tensor:
    """``[IS, max/mean device load]`` as a float tensor on the counts' device, with no host sync.

    For training loops that log every layer: stack these and read them back once per log line.
    """
    if V.integer("num_tokens", num_tokens) < 1:
        raise V.InvalidArgumentError("the Imbalance Score of an empty batch (0 tokens) is undefined")
    loads_D = device_loads_from_counts(expert_counts_N, num_devices).float()
    return torch.stack([(loads_D.max() - loads_D.min()) / num_tokens,
                        loads_D.max() / loads_D.mean().clamp(min=1e-9)])


def imbalance_score(expert_ids_TK: Tensor, num_experts: int, num_devices: int) -> float:
    """``IS(X) = (max_i T_i - min_i T_i) / |X|`` with |X| the number of tokens (rows of ids)."""
    _check(num_experts, num_devices)
    _check_ids(expert_ids_TK)
    counts_N = expert_counts(expert_ids_TK, num_experts)
    return float(balance_from_counts(counts_N, num_devices, expert_ids_TK.shape[0])[0])


def max_over_mean_load(loads: Tensor) -> float:
    """Busiest device's load over the mean load: the step-time factor under expert parallelism."""
    V.tensor("loads", loads, nonempty=True)
    loads = loads.float()
    mean = loads.mean()
    return float(loads.max() / mean) if float(mean) > 0 else 1.0


def expert_load_cv(expert_ids_TK: Tensor, num_experts: int) -> float:
    """Coefficient of variation (std / mean, population std) of per-expert token counts."""
    V.integer("num_experts", num_experts, 1)
    _check_ids(expert_ids_TK)
    counts_N = expert_counts(expert_ids_TK, num_experts).double()
    mean = counts_N.mean()
    return float(counts_N.std(unbiased=False) / mean) if float(mean) > 0 else 0.0
