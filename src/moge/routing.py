"""Routing rules as pure functions on router logits: MoGE, top-K and DeepSeek-style group-limited.

Shape legend
    T  tokens                  N  routed experts          M  expert groups (one per device)
    G  experts per group (N/M) K' experts chosen per group K  experts chosen per token (M*K' for MoGE)

Every rule takes a global float32 softmax over all N experts first (docs/design.md section 2), selects ids, and
weights each chosen expert by ``score * router_scale[e]`` with no renormalisation. Selected ids come back
``[T, K]`` int64; for MoGE they are group-major (group 0's picks first), each group's picks in
descending score, ties broken toward the lower expert id. The ``*_select`` functions work on scores
(so a layer computes the softmax once and reuses it for the auxiliary loss); the ``*_route`` functions
are the public entry points on logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validate as V

__all__ = [
    "router_scores", "moge_select", "moge_route", "topk_select", "topk_route",
    "group_limited_select", "group_limited_route", "aux_loss", "z_loss", "expert_counts",
]


def _check_logits(logits: Tensor, check_finite: bool) -> None:
    V.tensor("router logits", logits, "float")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise V.InvalidArgumentError(f"router logits must be 2-D [T, N] with N >= 1, got shape {tuple(logits.shape)}")
    if check_finite and not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise V.InvalidArgumentError(f"router logits contain {bad} non-finite values (NaN or inf) out of "
                                     f"{logits.numel()}")


def _check_scores(scores: Tensor) -> None:
    V.tensor("scores", scores, "float", dims=2)


def router_scores(logits_TN: Tensor, check_finite: bool = True) -> Tensor:
    """Global softmax over all N experts, computed in float32: ``[T, N] -> [T, N]``.

    ``check_finite`` raises on NaN/inf logits; it costs a device-to-host sync, so hot paths that
    already guard the loss (training) may turn it off.
    """
    _check_logits(logits_TN, check_finite)
    return torch.softmax(logits_TN.float(), dim=-1)


def _scale_vector(router_scale: Tensor | None, n: int) -> Tensor | None:
    if router_scale is None:
        return None
    V.tensor("router_scale", router_scale, "float")
    if router_scale.numel() != n:
        raise V.InvalidArgumentError(f"router_scale has {router_scale.numel()} entries (shape "
                                     f"{tuple(router_scale.shape)}), expected N={n} (shape [1, {n}])")
    return router_scale.reshape(n)


def _check_scale(router_scale: Tensor | None, n: int, check_finite: bool) -> None:
    """Public routes: the scale's type and size, and (with ``check_finite``) its values."""
    scale = _scale_vector(router_scale, n)
    if check_finite and scale is not None:
        V.all_finite("router_scale", scale)


def _gate_weights(scores_TN: Tensor, ids_TK: Tensor, router_scale: Tensor | None) -> Tensor:
    """``w = s[ids] * router_scale[ids]``, float32, no renormalisation."""
    w_TK = scores_TN.gather(1, ids_TK)
    scale_N = _scale_vector(router_scale, scores_TN.shape[1])
    if scale_N is not None:
        w_TK = w_TK * scale_N.float()[ids_TK]
    return w_TK


def _topk_stable(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries along the last dim, descending, ties -> lower index."""
    if k == 1:
        return x.argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def moge_select(scores_TN: Tensor, num_groups: int, k_per_group: int,
                router_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MoGE selection on softmax scores: top-K' inside each of M contiguous groups.

    Returns ``(weights [T, M*K'] float32, expert_ids [T, M*K'] int64)`` in group-major order.
    """
    _check_scores(scores_TN)
    t, n = scores_TN.shape
    V.integer("num_groups", num_groups)
    V.integer("k_per_group", k_per_group)
    if num_groups < 1 or n % num_groups:
        raise V.InvalidArgumentError(f"num_experts N={n} must be divisible by num_groups M={num_groups}")
    g = n // num_groups
    if not 1 <= k_per_group <= g:
        raise V.InvalidArgumentError(f"k_per_group K'={k_per_group} must be in [1, N/M={g}] (N={n}, M={num_groups})")
    local_TMK = _topk_stable(scores_TN.view(t, num_groups, g), k_per_group)  # ids inside each group
    offset_M1 = torch.arange(num_groups, device=scores_TN.device).mul_(g).view(1, num_groups, 1)
    ids_TK = (local_TMK + offset_M1).reshape(t, num_groups * k_per_group)
    return _gate_weights(scores_TN, ids_TK, router_scale), ids_TK


def moge_route(logits_TN: Tensor, num_groups: int, k_per_group: int, router_scale: Tensor | None = None,
               check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """MoGE routing (docs/design.md section 2): global softmax, contiguous groups, top-K' per group.

    Returns ``(weights [T, K], expert_ids [T, K])`` with K = M*K', group-major, weight = score * scale.
    """
    scores_TN = router_scores(logits_TN, check_finite)
    _check_scale(router_scale, scores_TN.shape[1], check_finite)
    return moge_select(scores_TN, num_groups, k_per_group, router_scale)


def topk_select(scores_TN: Tensor, k: int, router_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain top-K over all N experts on softmax scores; ids in descending score."""
    _check_scores(scores_TN)
    n = scores_TN.shape[1]
    V.integer("k", k)
    if not 1 <= k <= n:
        raise V.InvalidArgumentError(f"k={k} must be in [1, N={n}]")
    ids_TK = _topk_stable(scores_TN, k)
    return _gate_weights(scores_TN, ids_TK, router_scale), ids_TK


def topk_route(logits_TN: Tensor, k: int, router_scale: Tensor | None = None,
               check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Top-K baseline: global softmax, top-K over all N, same weighting as MoGE (= MoGE with M=1)."""
    scores_TN = router_scores(logits_TN, check_finite)
    _check_scale(router_scale, scores_TN.shape[1], check_finite)
    return topk_select(scores_TN, k, router_scale)


def group_limited_select(scores_TN: Tensor, k: int, num_groups: int, topk_groups: int,
                         router_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DeepSeek-style device-limited selection on softmax scores.

    Each group is scored by the sum of its top ``max(1, K // topk_groups)`` scores (capped at G), the
    best ``topk_groups`` groups are kept, and one top-K runs over the experts left. It bounds how many
    groups a token reaches; unlike MoGE it does not balance them.
    """
    _check_scores(scores_TN)
    t, n = scores_TN.shape
    for name, v in (("k", k), ("num_groups", num_groups), ("topk_groups", topk_groups)):
        V.integer(name, v)
    if num_groups < 1 or n % num_groups:
        raise V.InvalidArgumentError(f"num_experts N={n} must be divisible by num_groups M={num_groups}")
    g = n // num_groups
    if not 1 <= topk_groups <= num_groups:
        raise V.InvalidArgumentError(f"topk_groups={topk_groups} must be in [1, M={num_groups}]")
    if not 1 <= k <= topk_groups * g:
        raise V.InvalidArgumentError(f"k={k} must be in [1, topk_groups*G={topk_groups * g}] "
                         f"(topk_groups={topk_groups}, G={g})")
    per_group = min(g, max(1, k // topk_groups))
    scores_TMG = scores_TN.view(t, num_groups, g)
    group_score_TM = scores_TMG.topk(per_group, dim=-1).values.sum(-1)
    keep_TM = _topk_stable(group_score_TM, topk_groups)
    mask_TM = torch.zeros_like(group_score_TM, dtype=torch.bool).scatter_(1, keep_TM, True)
    # Scores are >= 0, so -1 puts every expert of a dropped group below every kept one.
    masked_TN = scores_TMG.masked_fill(~mask_TM.unsqueeze(-1), -1.0).view(t, n)
    ids_TK = _topk_stable(masked_TN, k)
    return _gate_weights(scores_TN, ids_TK, router_scale), ids_TK


def group_limited_route(logits_TN: Tensor, k: int, num_groups: int, topk_groups: int,
                        router_scale: Tensor | None = None, check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Group-limited baseline (DeepSeek-V2/V3 style) on logits; see :func:`group_limited_select`."""
    scores_TN = router_scores(logits_TN, check_finite)
    _check_scale(router_scale, scores_TN.shape[1], check_finite)
    return group_limited_select(scores_TN, k, num_groups, topk_groups, router_scale)


def expert_counts(expert_ids_TK: Tensor, num_experts: int, check: bool = True) -> Tensor:
    """Token-expert pairs per expert, ``[N]`` int64, computed on the ids' device (no host sync).

    ``check`` verifies the arguments and that every id is in ``[0, N)``; the id check reads the ids
    back (a sync on an accelerator), so the layer's own statistics, whose ids come from the router,
    pass ``check=False``.
    """
    if check:
        V.integer("num_experts", num_experts, 1)
        V.tensor("expert_ids", expert_ids_TK, "int")
        V.ids_in_range("expert_ids", expert_ids_TK, num_experts)
    # scatter_add, not bincount: on CUDA bincount syncs to read the largest id and size its output
    flat = expert_ids_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _check_pairs(scores_TN: Tensor, expert_ids_TK: Tensor) -> None:
    V.tensor("scores", scores_TN, "float", dims=2)
    V.tensor("expert_ids", expert_ids_TK, "int", dims=2)
    if expert_ids_TK.shape[0] != scores_TN.shape[0]:
        raise V.InvalidArgumentError(f"expert_ids has {expert_ids_TK.shape[0]} rows but scores has "
                                     f"{scores_TN.shape[0]} (one row per token)")
    if scores_TN.shape[0] == 0 or expert_ids_TK.shape[1] == 0:
        raise V.InvalidArgumentError("the balance loss of an empty batch (T=0 tokens or K=0 experts) is undefined")


def aux_loss(scores_TN: Tensor, expert_ids_TK: Tensor, alpha: float = 1.0, check: bool = True) -> Tensor:
    """Batch-level balance loss ``alpha * sum_i f_i * p_i`` (docs/design.md section 4).

    ``f_i = N / (K T) * count_i`` counts the tokens that selected expert i (no gradient), and
    ``p_i`` is the mean *global* softmax score of expert i over the batch (carries the gradient).
    With uniform routing the sum is 1, so ``alpha`` is the loss of a perfectly balanced router.
    ``check=False`` (the layer's own call) skips the argument checks and the id range read-back.
    """
    if check:
        _check_pairs(scores_TN, expert_ids_TK)
        V.number("alpha", alpha)
    t, n = scores_TN.shape
    k = expert_ids_TK.shape[1]
    f_N = expert_counts(expert_ids_TK, n, check=check).to(scores_TN.dtype) * (n / (k * t))
    p_N = scores_TN.mean(dim=0)
    return alpha * (f_N * p_N).sum()


def z_loss(logits_TN: Tensor, coef: float = 1.0) -> Tensor:
    """Router z-loss ``coef * mean_t logsumexp(z_t)^2`` (keeps router logits small; ST-MoE)."""
    V.tensor("router logits", logits_TN, "float", dims=2, nonempty=True)
    return coef * torch.logsumexp(logits_TN.float(), dim=-1).square().mean()
