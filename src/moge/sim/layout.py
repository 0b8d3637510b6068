"""Model shapes and parallel layouts for the performance model: parameter counts and the H2P layout.

Ranks are chips (see :mod:`moge.sim.hardware`): on the Ascend 300I Duo, 4 cards are 8 ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import MoGEConfig
from ..errors import MoGEError


class PerfError(MoGEError, ValueError):
    """Inconsistent performance-model inputs (layout, batch, precision)."""


# ---- parameter counts -------------------------------------------------------------------------------
def param_counts(config: MoGEConfig) -> dict[str, int]:
    """Analytical parameter counts: ``total``, ``activated`` (per token) and their parts.

    Per layer: q/k/v/o projections with biases, two RMSNorms; an MoE layer adds the router ``[N, H]``,
    ``router_scale [N]``, N experts of ``3 H F`` and a shared expert ``3 H Fs``; a dense
    (``mlp_only_layers``) layer a SwiGLU MLP ``3 H F_dense``. Plus embedding, final norm and the LM head
    (untied unless ``tie_word_embeddings``). Activated counts K experts per MoE layer instead of N and
    include the embedding and the head (the paper's convention).
    """
    c = config
    h, hd = c.hidden_size, c.resolved_head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = h * q + q + 2 * (h * kv + kv) + q * h + h
    norms = 2 * h
    expert = 3 * h * c.moe_intermediate_size
    shared = 3 * h * c.shared_expert_intermediate_size
    router = c.num_experts * h + c.num_experts
    dense_mlp = 3 * h * c.dense_intermediate_size
    n_dense = len(set(c.mlp_only_layers))
    n_moe = c.num_hidden_layers - n_dense
    embed = c.vocab_size * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    common = embed + head + h + c.num_hidden_layers * (attn + norms) + n_dense * dense_mlp
    total = common + n_moe * (router + c.num_experts * expert + shared)
    activated = common + n_moe * (router + c.num_experts_per_tok * expert + shared)
    return {"total": total, "activated": activated, "embedding": embed, "lm_head": head,
            "attention_per_layer": attn, "expert": expert, "shared_expert": shared,
            "moe_layers": n_moe, "dense_layers": n_dense}


# ---- layout -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """H2P hybrid parallel layout over ranks (chips); every product must equal the rank count."""

    attn_dp: int
    attn_tp: int
    expert_tp: int
    expert_ep: int
    shared_tp: int

    @property
    def ranks(self) -> int:
        return self.attn_dp * self.attn_tp

    def describe(self) -> str:
        return (f"attention DP{self.attn_dp} x TP{self.attn_tp}, experts TP{self.expert_tp} x "
                f"EP{self.expert_ep}, shared TP{self.shared_tp}")


def default_layout(config: MoGEConfig, ranks: int, attn_tp: int | None = None, expert_ep: int | None = None,
                   shared_tp: int | None = None) -> Layout:
    """Paper-like defaults over ``ranks`` chips: attention TP up to 4 (DP over the rest), EP over
    up to 4 ranks holding whole groups (expert TP over the rest), shared expert TP over every rank
    (docs/design.md section 7.3, at 8 ranks: attention DP2 x TP4, experts TP2 x EP4, shared TP8).
    Explicit values override."""
    if ranks < 1:
        raise PerfError(f"the rank count must be >= 1, got {ranks}")
    for flag, v in (("--attn-tp", attn_tp), ("--expert-ep", expert_ep), ("--shared-tp", shared_tp)):
        if v is not None and v < 1:
            raise PerfError(f"{flag} must be >= 1, got {v}")
    tp = attn_tp or math.gcd(ranks, 4)
    if expert_ep is None:
        ep = max(e for e in range(1, min(ranks, 4) + 1) if ranks % e == 0 and config.groups % e == 0)
    else:
        ep = expert_ep
    layout = Layout(ranks // tp if ranks % tp == 0 else -1, tp, ranks // ep if ranks % ep == 0 else -1, ep,
                    shared_tp or ranks)
    check_layout(config, layout, ranks)
    return layout


def check_layout(config: MoGEConfig, layout: Layout, ranks: int) -> None:
    """Raise :class:`PerfError` naming the problem if the layout does not fit the ranks or the model."""
    if layout.attn_dp < 1 or layout.attn_dp * layout.attn_tp != ranks:
        raise PerfError(f"attention TP {layout.attn_tp} does not divide {ranks} ranks (chips)")
    if layout.expert_tp < 1 or layout.expert_tp * layout.expert_ep != ranks:
        raise PerfError(f"expert EP {layout.expert_ep} does not divide {ranks} ranks (chips)")
    if layout.shared_tp < 1 or ranks % layout.shared_tp:
        raise PerfError(f"shared-expert TP {layout.shared_tp} does not divide {ranks} ranks (chips)")
    if config.num_experts % layout.expert_ep:
        raise PerfError(f"{config.num_experts} experts cannot be split over EP {layout.expert_ep}")
    if config.num_attention_heads % layout.attn_tp:
        raise PerfError(f"{config.num_attention_heads} query heads cannot be split over attention TP {layout.attn_tp}")
