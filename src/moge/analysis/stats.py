"""Expert-behaviour analyses of routing decisions (docs/design.md section 7.7), as pure functions on expert ids.

Shape legend: T tokens, K experts per token, N experts, M groups, G = N/M experts per group,
D devices (each owning a contiguous block of N/D experts), C domains (data sources).

These reproduce the paper's studies on our own models: per-expert token share (uniform is K/N),
co-activation of expert pairs (zero inside a group when K' = 1, by construction), the within-group
share of each expert (uniform is 1/G), the busiest expert's and busiest device's share of all
token-expert pairs, and how much the routing depends on the data domain. ``moge analyze`` runs them
on a checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..metrics import device_loads_from_counts
from ..routing import expert_counts


def expert_token_share(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Fraction of tokens that chose each expert, ``[N]`` float64; sums to K, uniform routing gives K/N."""
    t = expert_ids_TK.shape[0]
    if t == 0:
        raise ValueError("expert_token_share of an empty batch (0 tokens)")
    return expert_counts(expert_ids_TK, num_experts).double() / t


def coactivation_counts(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """``[N, N]`` float64 number of tokens that chose both expert i and expert j (diagonal: counts).

    ``A^T A`` of the token-by-expert one-hot matrix ``A [T, N]``; sums over batches add up exactly
    (integers in float64), so a large data set can be accumulated batch by batch.
    """
    a_TN = torch.zeros(expert_ids_TK.shape[0], num_experts, dtype=torch.float64, device=expert_ids_TK.device)
    a_TN.scatter_(1, expert_ids_TK, 1.0)
    return a_TN.T @ a_TN


def coactivation(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """``[N, N]`` fraction of tokens that chose both expert i and expert j (diagonal: token share)."""
    t = expert_ids_TK.shape[0]
    if t == 0:
        raise ValueError("coactivation of an empty batch (0 tokens)")
    return coactivation_counts(expert_ids_TK, num_experts) / t


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


def busiest_device_share(expert_counts_N: Tensor, num_devices: int) -> float:
    """The busiest device's share of all token-expert pairs, devices owning contiguous expert blocks
    (uniform is 1/D; MoGE with one group per device gives exactly 1/D)."""

    return busiest_expert_share(device_loads_from_counts(expert_counts_N, num_devices))


def _distributions(share_CN: Tensor) -> Tensor:
    """Rows of token shares (each summing to K) as probability distributions over experts."""
    if share_CN.dim() != 2 or share_CN.shape[0] == 0:
        raise ValueError(f"expected a [domains, experts] share matrix, got shape {tuple(share_CN.shape)}")
    total_C1 = share_CN.double().sum(-1, keepdim=True)
    if bool((total_C1 <= 0).any()):
        raise ValueError("a domain has no routed tokens (its shares sum to 0)")
    return share_CN.double() / total_C1


def distance_from_uniform(share_CN: Tensor) -> Tensor:
    """Total-variation distance of each domain's expert distribution from uniform, ``[C]`` in [0, 1).

    0 when every expert gets K/N of the domain's tokens. It mixes two things: load skew shared by
    all domains and domain specialisation; :func:`specialisation_index` isolates the second.
    """
    p_CN = _distributions(share_CN)
    return 0.5 * (p_CN - 1.0 / p_CN.shape[1]).abs().sum(-1)


def specialisation_index(share_CN: Tensor, tokens_C: Tensor | None = None) -> float:
    """How much the expert distribution depends on the domain: the token-weighted mean over domains
    of the total-variation distance between a domain's distribution and the pooled one, in [0, 1).

    Exactly 0 when every domain routes with the same distribution (however skewed); it grows as
    domains favour different experts. ``tokens_C`` weights the domains (default equal weights).
    """
    p_CN = _distributions(share_CN)
    w_C = (torch.ones(p_CN.shape[0], dtype=torch.float64) if tokens_C is None else tokens_C.double())
    if w_C.shape != (p_CN.shape[0],) or bool((w_C < 0).any()) or float(w_C.sum()) <= 0:
        raise ValueError("tokens_C must be one non-negative weight per domain, not all 0")
    w_C = w_C / w_C.sum()
    pooled_N = (w_C[:, None] * p_CN).sum(0)
    return float((w_C * 0.5 * (p_CN - pooled_N).abs().sum(-1)).sum())
