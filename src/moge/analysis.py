"""Expert-behaviour analyses of routing decisions (spec section 7), as pure functions on expert ids.

Shape legend: T tokens, K experts per token, N experts, M groups, G = N/M experts per group.

These reproduce the paper's studies on our own models: per-expert token share (uniform is K/N),
co-activation of expert pairs (zero inside a group when K' = 1, by construction), the within-group
share of each expert (uniform is 1/G), and the busiest expert's share of all token-expert pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routing import expert_counts


def expert_token_share(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Fraction of tokens that chose each expert, ``[N]`` float64; sums to K, uniform routing gives K/N."""
    t = expert_ids_TK.shape[0]
    if t == 0:
        raise ValueError("expert_token_share of an empty batch (0 tokens)")
    return expert_counts(expert_ids_TK, num_experts).double() / t


def coactivation(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """``[N, N]`` fraction of tokens that chose both expert i and expert j (diagonal: token share).

    Built as ``A^T A / T`` from the token-by-expert one-hot matrix ``A [T, N]``.
    """
    t = expert_ids_TK.shape[0]
    if t == 0:
        raise ValueError("coactivation of an empty batch (0 tokens)")
    a_TN = torch.zeros(t, num_experts, dtype=torch.float64, device=expert_ids_TK.device)
    a_TN.scatter_(1, expert_ids_TK, 1.0)
    return a_TN.T @ a_TN / t


def within_group_share(expert_counts_N: Tensor, num_groups: int) -> Tensor:
    """Each expert's share of its group's load, ``[M, G]`` (rows sum to 1; uniform is 1/G)."""
    n = expert_counts_N.numel()
    if num_groups < 1 or n % num_groups:
        raise ValueError(f"num_experts={n} must be divisible by num_groups={num_groups}")
    c_MG = expert_counts_N.double().reshape(num_groups, -1)
    return c_MG / c_MG.sum(-1, keepdim=True).clamp(min=1)


def busiest_expert_share(expert_counts_N: Tensor) -> float:
    """The busiest expert's share of all token-expert pairs (uniform is 1/N)."""
    total = float(expert_counts_N.sum())
    return float(expert_counts_N.max()) / total if total > 0 else 0.0


def share_by_domain(expert_ids_by_domain: dict[str, Tensor], num_experts: int) -> tuple[list[str], Tensor]:
    """Per-domain expert token share, stacked ``[num_domains, N]`` (rows in sorted domain order)."""
    names = sorted(expert_ids_by_domain)
    return names, torch.stack([expert_token_share(expert_ids_by_domain[d], num_experts) for d in names])
