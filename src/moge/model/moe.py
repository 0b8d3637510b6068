"""The MoGE feed-forward layer: router + per-expert scale + stacked routed experts + shared expert.

Shape legend
    T  tokens (all leading dims flattened)   H  hidden size    N  routed experts    M  groups
    K  experts per token                     K' experts per group (MoGE)

``y = sum_{e chosen} s_e * router_scale[e] * Expert_e(x) + SharedExpert(x)`` (docs/design.md section 2). The
forward is route -> dispatch -> experts -> combine: the *dispatcher* slot (:attr:`MoGELayer.dispatcher`)
decides where the experts run. :class:`LocalDispatcher` (the default) runs them all here;
:mod:`moge.parallel` installs expert-parallel dispatchers (exact-size MoGE, variable-size top-K) in the
same slot. The layer keeps no global state: routing statistics are returned with the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import validate as V
from ..config import ROUTERS, MoGEConfig
from ..experts import SwiGLU, SwiGLUExperts, available_backends
from ..routing import aux_loss, expert_counts, group_limited_select, moge_select, router_scores, topk_select, z_loss


@dataclass
class Routing:
    """One routing decision: global scores ``[T,N]``, gate weights and ids ``[T,K]``, raw logits ``[T,N]``."""
    logits: Tensor
    scores: Tensor
    weights: Tensor
    expert_ids: Tensor


@dataclass
class RouterStats:
    """Per-layer routing statistics of one forward, all tensors on the layer's device (no host sync).

    ``expert_counts [N]`` token-expert pairs per expert; ``group_loads [M]`` pairs per group (= per
    device when each device holds one group); ``aux_loss`` and ``z_loss`` are scalars already scaled
    by their coefficients; ``expert_ids [T,K]`` the raw choices and ``router_logits [T,N]`` (float32)
    the router's logits, for analysis and for transformers' ``output_router_logits``.
    """
    expert_counts: Tensor
    group_loads: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    expert_ids: Tensor
    num_tokens: int
    router_logits: Tensor | None = None


class LocalDispatcher:
    """Every routed expert lives on this device: the experts module computes all K choices of every token.

    A dispatcher is called as ``dispatcher(x_TH, routing, experts, backend) -> y_TH`` (the routed
    experts' weighted sum per token). It must run the experts through ``experts(...)`` (the module's
    ``__call__``), so that wrappers such as FSDP2 see the call and gather the weights first.
    """
    name = "local"

    def __call__(self, x_TH: Tensor, r: Routing, experts: nn.Module, backend: str | None) -> Tensor:
        return experts(x_TH, r.expert_ids, r.weights, backend=backend)

    def __repr__(self) -> str:
        return "LocalDispatcher()"


class MoGELayer(nn.Module):
    """Mixture-of-Grouped-Experts MLP with a selectable router (``moge``, ``topk``, ``group_limited``).

    Parameter names match the published checkpoint under ``mlp.``: ``gate.weight [N,H]``,
    ``router_scale [1,N]``, ``experts`` (stacked; see :class:`SwiGLUExperts`), ``shared_expert``.
    ``dispatcher`` (not a module, no parameters) sends the routed tokens to the experts and back:
    :class:`LocalDispatcher` unless expert parallelism installed another.
    """

    def __init__(self, hidden_size: int, num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 shared_expert_intermediate_size: int = 0, num_groups: int | None = None, router: str = "moge",
                 topk_groups: int | None = None, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 experts_backend: str = "auto"):
        super().__init__()
        for name, value, lo in (("hidden_size", hidden_size, 1), ("num_experts", num_experts, 1),
                                ("num_experts_per_tok", num_experts_per_tok, 1),
                                ("moe_intermediate_size", moe_intermediate_size, 1),
                                ("shared_expert_intermediate_size", shared_expert_intermediate_size, 0)):
            V.integer(name, value, lo)
        V.integer("num_groups", num_groups, 1, optional=True)
        V.integer("topk_groups", topk_groups, 1, optional=True)
        V.number("aux_loss_coef", aux_loss_coef, 0.0)
        V.number("z_loss_coef", z_loss_coef, 0.0)
        V.choice("experts_backend", experts_backend, ["auto", *available_backends()])
        m = num_groups if num_groups is not None else num_experts_per_tok
        if router not in ROUTERS:
            raise V.InvalidArgumentError(f"router must be one of {ROUTERS}, got {router!r}")
        if num_experts_per_tok > num_experts:
            raise V.InvalidArgumentError(f"num_experts_per_tok={num_experts_per_tok} exceeds num_experts={num_experts}")
        if m < 1 or num_experts % m:
            raise V.InvalidArgumentError(f"num_experts={num_experts} is not divisible by num_groups={m}")
        if router == "moge" and (num_experts_per_tok % m or not 1 <= num_experts_per_tok // m <= num_experts // m):
            raise V.InvalidArgumentError(f"MoGE needs num_experts_per_tok={num_experts_per_tok} = num_groups={m} x K' with "
                             f"1 <= K' <= {num_experts // m}")
        self.hidden_size, self.num_experts, self.top_k, self.num_groups = hidden_size, num_experts, num_experts_per_tok, m
        self.router = router
        self.topk_groups = topk_groups if topk_groups is not None else max(1, m // 2)
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.router_scale = nn.Parameter(torch.ones(1, num_experts))
        self.experts = SwiGLUExperts(num_experts, hidden_size, moe_intermediate_size, backend=experts_backend)
        self.shared_expert = SwiGLU(hidden_size, shared_expert_intermediate_size) if shared_expert_intermediate_size else None
        self.dispatcher = LocalDispatcher()

    @classmethod
    def from_config(cls, config: MoGEConfig) -> "MoGELayer":
        return cls(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                   config.shared_expert_intermediate_size, config.groups, config.router, config.resolved_topk_groups,
                   config.router_aux_loss_coef, config.router_z_loss_coef, config.experts_backend)

    @property
    def k_per_group(self) -> int:
        return self.top_k // self.num_groups

    def route(self, x_TH: Tensor, check_finite: bool = False) -> Routing:
        """Router logits (float32), global softmax, and the configured selection rule."""
        # Autocast (bf16 training) would silently run this matmul in low precision and can flip the
        # per-group argmax; docs/design.md section 2 computes router logits in float32.
        with torch.autocast(x_TH.device.type, enabled=False):
            logits_TN = nn.functional.linear(x_TH.float(), self.gate.weight.float())
        scores_TN = router_scores(logits_TN, check_finite)
        if self.router == "moge":
            w_TK, ids_TK = moge_select(scores_TN, self.num_groups, self.k_per_group, self.router_scale)
        elif self.router == "topk":
            w_TK, ids_TK = topk_select(scores_TN, self.top_k, self.router_scale)
        else:
            w_TK, ids_TK = group_limited_select(scores_TN, self.top_k, self.num_groups, self.topk_groups,
                                                self.router_scale)
        return Routing(logits_TN, scores_TN, w_TK, ids_TK)

    def stats(self, r: Routing) -> RouterStats:
        """Counts, per-group loads and the (coefficient-scaled) auxiliary losses of a routing."""
        counts_N = expert_counts(r.expert_ids, self.num_experts, check=False)
        zero = r.scores.new_zeros(())
        return RouterStats(
            expert_counts=counts_N,
            group_loads=counts_N.view(self.num_groups, -1).sum(-1),
            aux_loss=aux_loss(r.scores, r.expert_ids, self.aux_loss_coef, check=False) if self.aux_loss_coef else zero,
            z_loss=z_loss(r.logits, self.z_loss_coef) if self.z_loss_coef else zero,
            expert_ids=r.expert_ids,
            num_tokens=r.expert_ids.shape[0],
            router_logits=r.logits,
        )

    def check_input(self, x: Tensor) -> None:
        """Refuse what the layer cannot compute, from metadata only (no host sync): a non-tensor, a
        non-float or complex dtype, a last dimension other than H, no tokens, or a dtype other than
        the weights' outside autocast."""
        V.tensor("MoGELayer input x", x, "float", last=self.hidden_size)
        if x.numel() == 0:
            raise V.InvalidArgumentError(f"MoGELayer input x has no tokens (shape {tuple(x.shape)})")
        w = self.gate.weight
        if x.dtype != w.dtype and w.device.type != "meta" and not torch.is_autocast_enabled(x.device.type):
            raise V.ArgumentTypeError(f"MoGELayer input x has dtype {x.dtype} but the layer's weights are "
                                      f"{w.dtype}; cast one to the other (or run under torch.autocast)")

    def forward(self, x: Tensor, backend: str | None = None,
                with_stats: bool = True) -> tuple[Tensor, RouterStats | None]:
        """``x [..., H] -> (y [..., H], RouterStats)``; bad inputs fail in :meth:`check_input`.
        ``with_stats=False`` (decoding) skips the statistics and losses and returns None for them."""
        self.check_input(x)
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        r = self.route(x_TH)
        y_TH = self.dispatcher(x_TH, r, self.experts, backend)
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared_expert(x_TH)  # ungated (docs/design.md section 2)
        return y_TH.view(shape), self.stats(r) if with_stats else None

    def extra_repr(self) -> str:
        return (f"router={self.router!r}, num_groups={self.num_groups}, top_k={self.top_k}, "
                f"dispatcher={self.dispatcher!r}")
