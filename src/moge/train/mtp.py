"""Multi-token prediction in training (``moge train --mtp N --mtp-coef C``): the loss term and the metrics.

Shape legend
    D  predictors (``num_mtp_layers``)    N  routed experts    M  expert groups

The training loss is ``LM loss + C * mean_k(loss_k) + aux`` where ``loss_k`` is predictor k's
cross-entropy on the token k+1 ahead and ``aux`` (the model's ``aux_loss``) already holds the
predictors' balance losses. DeepSeek-V3 trains with C = 0.3 for the first 10T tokens, then 0.1.

Metrics: ``type: "train"`` lines get ``mtp_loss`` (the mean over predictors), ``mtp`` (per predictor:
loss and top-1 accuracy, the acceptance-rate proxy of greedy speculative decoding) and
``mtp_layers`` (the predictors' MoGE layers' balance, in the format of ``layers`` but kept apart
so that consumers of ``layers`` keep seeing exactly ``num_hidden_layers`` entries); ``type: "eval"``
lines get ``mtp`` with each predictor's validation loss and accuracy per domain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..metrics import balance_from_counts
from ..parallel import all_reduce_mean


DEFAULT_MTP_COEF = 0.3
MAX_MTP = 16  # predictors this far ahead are rarely accepted; also bounds what a typo can allocate


def mtp_loss_term(mtp_outputs: list, coef: float, like: Tensor) -> Tensor:
    """``coef * mean_k loss_k`` (a zero scalar like ``like`` without predictors)."""
    if not mtp_outputs:
        return torch.zeros((), device=like.device, dtype=like.dtype)
    return coef * torch.stack([o.loss for o in mtp_outputs]).mean()


def layer_records(counts: list[Tensor | None], balances: Tensor, groups: int, first_layer: int = 0,
                  extra=None) -> list[dict[str, Any]]:
    """Per-layer balance over a logging interval from ``balances [steps*micro, layers_moe, 2]`` (IS,
    max/mean load: mean and max) and the last step's ``counts`` (``[N]`` per layer, None = dense);
    ``extra(i)`` adds fields to layer ``first_layer + i``'s record."""
    out, j = [], 0
    for i, cnt in enumerate(counts):
        rec: dict[str, Any] = {"layer": first_layer + i, **(extra(i) if extra else {})}
        if cnt is None:
            out.append({**rec, "dense": True})
            continue
        out.append({**rec, "imbalance_score": float(balances[:, j, 0].mean()),
                    "imbalance_score_max": float(balances[:, j, 0].max()),
                    "max_mean_load": float(balances[:, j, 1].mean()),
                    "max_mean_load_max": float(balances[:, j, 1].max()),
                    "group_loads": cnt.view(groups, -1).sum(-1).tolist(), "expert_counts": cnt.tolist()})
        j += 1
    return out


class MTPStep:
    """One optimizer step's predictor losses, accuracies, expert counts and balance rows (summed over
    micro-batches on the device; read back once in :meth:`result`)."""

    def __init__(self, groups: int):
        self.groups = groups
        self.loss_D: Tensor | None = None
        self.acc_D: Tensor | None = None
        self.counts: list[Tensor | None] | None = None
        self.balance: list[Tensor] = []  # per micro-batch [D_moe, 2]
        self.micro = 0

    def add(self, mtp_outputs: list) -> None:
        """Accumulate one micro-batch's :class:`moge.model.mtp.MTPOutput` list."""
        if not mtp_outputs:
            return
        loss_D = torch.stack([o.loss.detach().float() for o in mtp_outputs])
        acc_D = torch.stack([o.accuracy.detach().float() for o in mtp_outputs])
        self.loss_D = loss_D if self.loss_D is None else self.loss_D + loss_D
        self.acc_D = acc_D if self.acc_D is None else self.acc_D + acc_D
        stats = [o.router_stats for o in mtp_outputs]
        step_counts = [None if st is None else st.expert_counts.detach() for st in stats]
        self.counts = step_counts if self.counts is None else [
            None if a is None else a + b for a, b in zip(self.counts, step_counts)]
        rows = [balance_from_counts(st.expert_counts, self.groups, st.num_tokens) for st in stats if st is not None]
        if rows:
            self.balance.append(torch.stack(rows))
        self.micro += 1

    def result(self, group) -> dict[str, Any]:
        """``mtp_loss`` / ``mtp_accuracy`` (per predictor, mean over micro-batches and ranks),
        ``mtp_counts`` and ``mtp_balance [micro, D_moe, 2]``; empty lists without predictors."""
        if self.loss_D is None:
            return {"mtp_loss": [], "mtp_accuracy": [], "mtp_counts": [], "mtp_balance": None}
        loss_D = all_reduce_mean(self.loss_D, group) / self.micro  # equal rows per rank: the global mean
        acc_D = all_reduce_mean(self.acc_D, group) / self.micro
        return {"mtp_loss": loss_D.cpu().tolist(), "mtp_accuracy": acc_D.cpu().tolist(),
                "mtp_counts": [None if t is None else t.cpu() for t in self.counts],
                "mtp_balance": torch.stack(self.balance).cpu() if self.balance else None}


class MTPInterval:
    """The predictors' metrics over one logging interval, for a ``type: "train"`` line."""

    def __init__(self, num_layers: int, groups: int):
        self.num_layers, self.groups = num_layers, groups
        self.reset()

    def reset(self) -> None:
        self.losses: list[list[float]] = []
        self.accs: list[list[float]] = []
        self.balances: list[Tensor] = []

    def add(self, r: dict[str, Any]) -> None:
        """Take one :meth:`MTPStep.result` (the trainer's step result holds its keys)."""
        if r["mtp_loss"]:
            self.losses.append(r["mtp_loss"])
            self.accs.append(r["mtp_accuracy"])
        if r["mtp_balance"] is not None:
            self.balances.append(r["mtp_balance"])

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        """``mtp_loss``, ``mtp`` and ``mtp_layers`` fields (none without predictors); ``r`` is the last step."""
        if not self.losses:
            return {}
        d = len(self.losses[0])
        mean_D = [sum(x[k] for x in self.losses) / len(self.losses) for k in range(d)]
        acc_D = [sum(x[k] for x in self.accs) / len(self.accs) for k in range(d)]
        per = [{"predictor": k + 1, "layer": self.num_layers + k, "loss": mean_D[k], "last_loss": r["mtp_loss"][k],
                "accuracy": acc_D[k], "last_accuracy": r["mtp_accuracy"][k]} for k in range(d)]
        layers = layer_records(r["mtp_counts"], torch.cat(self.balances), self.groups, self.num_layers,
                               lambda i: {"predictor": i + 1}) if self.balances else []
        return {"mtp_loss": sum(mean_D) / d, "mtp": per, "mtp_layers": layers}


class MTPEval:
    """Each predictor's validation loss and top-1 accuracy per domain, weighted by predicted positions."""

    def __init__(self):
        self.sums: dict[str, list[list[float]]] = {}  # domain -> per predictor [loss*n, acc*n, n]

    def add(self, domain: str, mtp_outputs: list, batch: int, seq: int) -> None:
        """Accumulate one validation batch of ``batch`` rows of ``seq`` tokens."""
        rows = self.sums.setdefault(domain, [[0.0, 0.0, 0] for _ in mtp_outputs])
        for k, o in enumerate(mtp_outputs, start=1):
            n = batch * (seq - k - 1)  # predictor k predicts positions k+1 .. seq-1 from 0 .. seq-k-2
            rows[k - 1][0] += float(o.loss) * n
            rows[k - 1][1] += float(o.accuracy) * n
            rows[k - 1][2] += n

    def record(self) -> dict[str, Any]:
        """The ``mtp`` field of an eval line (none without predictors)."""
        if not self.sums or not next(iter(self.sums.values())):
            return {}
        d = len(next(iter(self.sums.values())))
        per = []
        for k in range(d):
            loss = {dom: v[k][0] / max(v[k][2], 1) for dom, v in self.sums.items()}
            acc = {dom: v[k][1] / max(v[k][2], 1) for dom, v in self.sums.items()}
            per.append({"predictor": k + 1, "val_loss": loss, "val_loss_mean": sum(loss.values()) / len(loss),
                        "val_accuracy": acc, "val_accuracy_mean": sum(acc.values()) / len(acc)})
        return {"mtp": per}
