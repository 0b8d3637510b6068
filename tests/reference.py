"""An independent float64 reference of MoGE routing, the balance loss and the MoE layer forward.

Written from the project spec (``docs/design.md``, sections 2 and 4) only: it imports nothing from
``moge`` and uses plain per-token / per-expert Python loops, so a bug in the vectorised library code
cannot hide in a shared helper. Everything is float64 and differentiable with torch autograd, so the
tests can also compare gradients.

Shape legend
    T  tokens   H  hidden size   N  routed experts   M  groups   G  experts per group (N/M)
    K  experts per token         F  expert intermediate size
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax64(logits_TN: Tensor) -> Tensor:
    """Row softmax in float64 written out by hand (max-shifted exponentials over their sum)."""
    z = logits_TN.double()
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _rank_desc(values: list[float], ids: list[int]) -> list[int]:
    """``ids`` ordered by descending value, equal values by ascending id (the spec's tie rule)."""
    return [i for _, i in sorted(zip(values, ids), key=lambda vi: (-vi[0], vi[1]))]


def moge_ids(scores_TN: Tensor, num_groups: int, k_per_group: int) -> list[list[int]]:
    """Per token: for each contiguous group in order, its top-K' expert ids by descending score."""
    t, n = scores_TN.shape
    g = n // num_groups
    out = []
    for row in scores_TN.tolist():
        picks = []
        for grp in range(num_groups):
            ids = list(range(grp * g, grp * g + g))
            picks += _rank_desc([row[i] for i in ids], ids)[:k_per_group]
        out.append(picks)
    return out


def topk_ids(scores_TN: Tensor, k: int) -> list[list[int]]:
    """Per token: the k highest-scoring expert ids over all N, descending, ties to the lower id."""
    n = scores_TN.shape[1]
    return [_rank_desc(row, list(range(n)))[:k] for row in scores_TN.tolist()]


def group_limited_ids(scores_TN: Tensor, k: int, num_groups: int, topk_groups: int) -> list[list[int]]:
    """DeepSeek-style: score each group by the sum of its top-max(1, K//topk_groups) scores, keep the
    ``topk_groups`` best groups (ties to the lower group), then the top-k over the kept experts."""
    n = scores_TN.shape[1]
    g = n // num_groups
    per_group = min(g, max(1, k // topk_groups))
    out = []
    for row in scores_TN.tolist():
        group_score = [sum(sorted(row[grp * g:(grp + 1) * g], reverse=True)[:per_group]) for grp in range(num_groups)]
        kept = _rank_desc(group_score, list(range(num_groups)))[:topk_groups]
        ids = [e for e in range(n) if e // g in kept]
        out.append(_rank_desc([row[e] for e in ids], ids)[:k])
    return out


def route(logits_TN: Tensor, router: str, k: int, num_groups: int, topk_groups: int | None = None,
          router_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference routing: ``(scores [T,N] f64, weights [T,K] f64, ids [T,K] int64)``.

    weight of chosen expert e = s_e * router_scale[e], no renormalisation (docs/design.md section 2 step 5).
    """
    scores_TN = softmax64(logits_TN)
    if router == "moge":
        ids = moge_ids(scores_TN, num_groups, k // num_groups)
    elif router == "topk":
        ids = topk_ids(scores_TN, k)
    elif router == "group_limited":
        ids = group_limited_ids(scores_TN, k, num_groups, topk_groups)
    else:
        raise ValueError(router)
    ids_TK = torch.tensor(ids, dtype=torch.long).reshape(len(ids), k)
    rows = []
    for t in range(ids_TK.shape[0]):
        w = []
        for e in ids_TK[t].tolist():
            s = scores_TN[t, e]
            w.append(s * router_scale.reshape(-1)[e].double() if router_scale is not None else s)
        rows.append(torch.stack(w))
    return scores_TN, torch.stack(rows), ids_TK


def aux_loss(scores_TN: Tensor, ids_TK: Tensor, alpha: float) -> Tensor:
    """``alpha * sum_i f_i p_i``, f_i = N/(K|B|) * #tokens choosing i, p_i = mean score of i (spec 4)."""
    t, n = scores_TN.shape
    k = ids_TK.shape[1]
    total = scores_TN.new_zeros(())
    for i in range(n):
        count = sum(1 for row in ids_TK.tolist() if i in row)
        f_i = n / (k * t) * count
        p_i = scores_TN[:, i].sum() / t
        total = total + f_i * p_i
    return alpha * total


def swiglu(x_H: Tensor, w_gate_FH: Tensor, w_up_FH: Tensor, w_down_HF: Tensor) -> Tensor:
    """``down(silu(gate x) * up x)``, no biases, with silu(a) = a * sigmoid(a) written out."""
    a = w_gate_FH @ x_H
    return w_down_HF @ (a * torch.sigmoid(a) * (w_up_FH @ x_H))


def layer_forward(x_TH: Tensor, params: dict[str, Tensor], router: str, k: int, num_groups: int,
                  topk_groups: int | None = None) -> Tensor:
    """The MoE layer of docs/design.md section 2, token by token.

    ``params``: ``gate [N,H]``, ``router_scale [1,N]``, ``w_gate [N,F,H]``, ``w_up [N,F,H]``,
    ``w_down [N,H,F]`` (per-expert ``[out, in]`` matrices) and optionally ``shared_gate [Fs,H]``,
    ``shared_up [Fs,H]``, ``shared_down [H,Fs]``. Returns ``y [T,H]`` float64.
    """
    logits_TN = x_TH.double() @ params["gate"].double().T
    _, w_TK, ids_TK = route(logits_TN, router, k, num_groups, topk_groups, params["router_scale"])
    out = []
    for t in range(x_TH.shape[0]):
        x_H = x_TH[t].double()
        y_H = torch.zeros_like(x_H)
        for j, e in enumerate(ids_TK[t].tolist()):
            y_H = y_H + w_TK[t, j] * swiglu(x_H, params["w_gate"][e].double(), params["w_up"][e].double(),
                                            params["w_down"][e].double())
        if "shared_gate" in params:
            y_H = y_H + swiglu(x_H, params["shared_gate"].double(), params["shared_up"].double(),
                               params["shared_down"].double())
        out.append(y_H)
    return torch.stack(out)
