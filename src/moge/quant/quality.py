"""How close a quantized model is to full precision: per-domain loss, routing agreement and routing KL.

Shape legend
    B  batch   S  positions   T  tokens (B*S)   N  routed experts   K  experts per token

Both models read the same validation rows. Per MoE layer, *routing agreement* is the fraction of tokens
whose set of chosen experts equals full precision's, and the *routing KL* is the mean over tokens of
``KL(p_fp || p_q)`` between the two routers' softmax probabilities over all N experts. Differences come
from quantizing the layers before the router (the router itself stays in float).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..progress import progress as progress_bar


@dataclass
class Quality:
    """Per-domain mean token loss of both models, and per-MoE-layer agreement / KL (by layer index)."""
    loss_fp: dict[str, float] = field(default_factory=dict)
    loss_q: dict[str, float] = field(default_factory=dict)
    agreement: dict[int, float] = field(default_factory=dict)
    kl: dict[int, float] = field(default_factory=dict)
    tokens: int = 0

    def relative_loss(self) -> dict[str, float]:
        """``loss_q / loss_fp - 1`` per domain."""
        return {d: self.loss_q[d] / self.loss_fp[d] - 1.0 for d in self.loss_fp}

    def table(self, name: str = "W8A8") -> str:
        """Markdown: one row per domain (fp, quantized, relative change), then agreement and KL per layer."""
        lines = [f"| domain | full precision | {name} | change |", "|---|---|---|---|"]
        rel = self.relative_loss()
        for d in sorted(self.loss_fp):
            lines.append(f"| {d} | {self.loss_fp[d]:.4f} | {self.loss_q[d]:.4f} | {100 * rel[d]:+.2f}% |")
        lines += ["", "| MoE layer | routing agreement | routing KL |", "|---|---|---|"]
        lines += [f"| {i} | {100 * self.agreement[i]:.2f}% | {self.kl[i]:.2e} |" for i in sorted(self.agreement)]
        return "\n".join(lines)

    def summary(self, name: str, label: str = "W8A8 (expert-aware, static)") -> str:
        """Markdown: a full-precision row and a quantized row (loss per domain with the relative change,
        lowest routing agreement over the MoE layers)."""
        domains = sorted(self.loss_fp)
        rel = self.relative_loss()
        lines = ["| model | " + " | ".join(f"val {d}" for d in domains) + " | routing agreement (worst layer) |",
                 "|" + "---|" * (len(domains) + 2),
                 f"| {name} fp32 | " + " | ".join(f"{self.loss_fp[d]:.3f}" for d in domains) + " | - |",
                 f"| {name} {label} | " + " | ".join(f"{self.loss_q[d]:.3f} ({100 * rel[d]:+.2f}%)" for d in domains)
                 + (f" | {100 * min(self.agreement.values()):.1f}% |" if self.agreement else " - |")]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"loss_fp": self.loss_fp, "loss_q": self.loss_q, "relative_loss": self.relative_loss(),
                "agreement": {str(k): v for k, v in self.agreement.items()},
                "kl": {str(k): v for k, v in self.kl.items()}, "tokens": self.tokens}


def routing_agreement(ids_a_TK: Tensor, ids_b_TK: Tensor) -> Tensor:
    """Per token: 1 where both chose the same set of experts (order ignored), else 0 -> ``[T]`` bool."""
    return (ids_a_TK.sort(-1).values == ids_b_TK.sort(-1).values).all(-1)


def routing_kl(logits_p_TN: Tensor, logits_q_TN: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))`` per token -> ``[T]`` (float32)."""
    lp, lq = logits_p_TN.float().log_softmax(-1), logits_q_TN.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.inference_mode()
def compare(fp_model: nn.Module, q_model: nn.Module, val_rows: Mapping[str, Tensor], batch_size: int = 8,
            progress: bool = False) -> Quality:
    """Run both models over every domain's rows ``[R, S]`` and measure (see the module docstring)."""
    device = next(fp_model.parameters()).device
    out = Quality()
    agree: dict[int, float] = {}
    kl: dict[int, float] = {}
    n_tok = 0
    batches = [(d, rows[i:i + batch_size]) for d, rows in val_rows.items() for i in range(0, len(rows), batch_size)]
    sums: dict[str, list[float]] = {d: [0.0, 0.0, 0] for d in val_rows}
    for m in (fp_model, q_model):
        m.eval()
    bar = progress_bar(len(batches), "evaluating", "batch", disable=not progress)
    for domain, x_BS in batches:
        bar.update(1)
        x_BS = x_BS.to(device)
        a = fp_model(input_ids=x_BS, labels=x_BS)
        b = q_model(input_ids=x_BS, labels=x_BS)
        n = x_BS.shape[0] * (x_BS.shape[1] - 1)
        s = sums[domain]
        s[0] += float(a.loss) * n
        s[1] += float(b.loss) * n
        s[2] += n
        for i, (sa, sb) in enumerate(zip(a.router_stats, b.router_stats)):
            if sa is None:
                continue
            agree[i] = agree.get(i, 0.0) + float(routing_agreement(sa.expert_ids, sb.expert_ids).sum())
            kl[i] = kl.get(i, 0.0) + float(routing_kl(sa.router_logits, sb.router_logits).sum())
        n_tok += x_BS.numel()
    bar.close()
    for d, (la, lb, n) in sums.items():
        out.loss_fp[d], out.loss_q[d] = (la / n, lb / n) if n else (math.nan, math.nan)
    out.agreement = {i: v / n_tok for i, v in agree.items()}
    out.kl = {i: v / n_tok for i, v in kl.items()}
    out.tokens = n_tok
    return out
