"""Expert parallelism for :class:`moge.model.moe.MoGELayer`: whole expert groups per rank, two dispatchers.

Shape legend
    T  local tokens on this rank       H  hidden size          E  ranks in the expert-parallel group
    N  routed experts (global)         L  experts per rank (N/E, a contiguous block of whole groups)
    K  experts per token               C  choices per token that land on one rank under MoGE (K/E)
    P  token-expert pairs (T*K)        R  rows received by this rank

Rank r owns experts ``r*L ... (r+1)*L - 1``, i.e. groups ``r*M/E ... (r+1)*M/E - 1``. The router
(``gate``, ``router_scale``) and the shared expert are replicated; each rank routes its own tokens.

Two dispatchers, kept apart so they can be measured side by side:

* :func:`fixed_split_moe` (MoGE). Every token has exactly C choices on every rank and the ids are
  group-major, so the choices for rank r are the contiguous slice ``[:, r*C:(r+1)*C]``. Each token is
  sent once to every rank together with its C local expert ids and gate weights; the receiving rank
  applies its experts and the gate weights and sends back one row per token. Every all-to-all has equal
  splits known before the call: no count exchange, no host sync, static shapes. Only the per-expert
  offsets inside a rank vary, and the experts backend computes them on the device.
* :func:`variable_split_moe` (top-K / group-limited). The usual dropless dispatch: an all-to-all of
  per-expert counts, a device-to-host copy of the row counts, then variable-size all-to-alls of token
  rows and of expert outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import MoGEError
from ..experts import ExpertsBackend, SwiGLUExperts, get_experts_backend, sort_pairs
from ..model.moe import MoGELayer, RouterStats
from .comm import all_to_all, rank_and_world


DISPATCHERS = ("auto", "fixed", "variable")


class ExpertParallelError(MoGEError, ValueError):
    """An expert-parallel layout that cannot work (e.g. groups not divisible by ranks)."""


def fixed_split_moe(x_TH: Tensor, w_TK: Tensor, ids_TK: Tensor, experts: SwiGLUExperts, backend: ExpertsBackend,
                    rank: int, world: int, group: dist.ProcessGroup | None) -> Tensor:
    """Routed-expert output ``[T,H]`` for MoGE routing with equal, precomputed all-to-all splits.

    ``ids_TK`` must be group-major MoGE choices and every rank must hold the same number of local
    tokens T (the static-shape contract). Three all-to-alls forward (tokens, ids+weights, outputs),
    three backward, all with ``None`` splits; nothing is read back to the host.
    """
    t, h = x_TH.shape
    k = ids_TK.shape[1]
    c, n_local = k // world, experts.num_experts
    # Receiver-local expert ids: slice r of the group-major choices belongs to rank r.
    base_E1 = torch.arange(world, device=ids_TK.device).mul_(n_local).view(world, 1, 1)
    local_ids_ETC = ids_TK.view(t, world, c).transpose(0, 1) - base_E1
    w_ETC = w_TK.view(t, world, c).transpose(0, 1).float()
    # Ids ride with the weights in one float32 message (exact for any realistic expert count), so
    # dispatch costs two exchanges, not three; the weights keep their gradient through it.
    meta_ET2C = torch.cat([w_ETC, local_ids_ETC.float()], dim=-1).reshape(world * t, 2 * c)
    send_x_RH = x_TH.unsqueeze(0).expand(world, t, h).reshape(world * t, h)

    recv_x_RH = all_to_all(send_x_RH, group=group)          # block s: the tokens of rank s
    recv_meta_R2C = all_to_all(meta_ET2C, group=group)
    recv_w_RC, recv_ids_RC = recv_meta_R2C[:, :c], recv_meta_R2C[:, c:].detach().long()
    # Weighted sum over this rank's C choices per token, computed where the experts live.
    y_RH = backend(recv_x_RH, recv_ids_RC, recv_w_RC, experts.gate_up_proj, experts.down_proj)
    back_RH = all_to_all(y_RH, group=group)                  # block r: my tokens' share from rank r
    return back_RH.view(world, t, h).sum(0)


def variable_split_moe(x_TH: Tensor, w_TK: Tensor, ids_TK: Tensor, experts: SwiGLUExperts,
                       backend: ExpertsBackend, rank: int, world: int,
                       group: dist.ProcessGroup | None) -> Tensor:
    """Routed-expert output ``[T,H]`` for any routing, with the usual count exchange (the baseline).

    Pairs are sorted by expert (so by destination rank), per-expert counts are exchanged with an
    all-to-all, row counts are copied to the host to size the buffers, and token rows / expert outputs
    move with variable-split all-to-alls. Gate weights are applied back on the token's own rank.
    """
    n_local = experts.num_experts
    order_P, token_P, counts_N = sort_pairs(ids_TK, n_local * world)
    # 1. counts: recv_counts[s, l] = rows rank s sends to my local expert l
    recv_counts_N = torch.empty_like(counts_N)
    dist.all_to_all_single(recv_counts_N, counts_N, group=group)
    recv_counts_EL = recv_counts_N.view(world, n_local)
    # 2. the host sync every dropless top-K dispatcher pays: buffer sizes must be known on the host
    in_splits = counts_N.view(world, n_local).sum(1).tolist()
    out_splits = recv_counts_EL.sum(1).tolist()
    # 3. token rows out, expert outputs back
    recv_x_RH = all_to_all(x_TH[token_P], out_splits, in_splits, group)
    local_ids_R = torch.repeat_interleave(torch.arange(n_local, device=x_TH.device).repeat(world),
                                          recv_counts_EL.reshape(-1), output_size=sum(out_splits))
    ones_R1 = torch.ones(local_ids_R.shape[0], 1, device=x_TH.device)
    y_RH = backend(recv_x_RH, local_ids_R.unsqueeze(1), ones_R1, experts.gate_up_proj, experts.down_proj)
    y_PH = all_to_all(y_RH, in_splits, out_splits, group)
    y_PH = y_PH * w_TK.reshape(-1)[order_P].unsqueeze(-1).to(y_PH.dtype)
    return torch.zeros_like(x_TH).index_add(0, token_P, y_PH)


class ExpertParallelMoGELayer(MoGELayer):
    """A :class:`MoGELayer` whose routed experts are sharded over a process group by whole groups.

    Built from a single-device layer by :func:`apply_expert_parallel`; parameter names are unchanged
    (``experts.gate_up_proj`` now holds this rank's ``[L,2F,H]`` block). ``forward`` takes this rank's
    local tokens and returns what the unsharded layer returns for them: ``(y, RouterStats)``.
    ``dispatch`` is ``fixed`` (MoGE, no count exchange), ``variable`` (count exchange) or ``auto``
    (``fixed`` for the MoGE router, ``variable`` otherwise).
    """

    def __init__(self, layer: MoGELayer, group: dist.ProcessGroup | None, dispatch: str = "auto"):
        nn.Module.__init__(self)
        rank, world = rank_and_world(group)
        m = layer.num_groups
        if m % world:
            raise ExpertParallelError(f"expert parallelism shards whole expert groups: num_groups M={m} must be "
                                      f"divisible by the expert-parallel size E={world}")
        if dispatch not in DISPATCHERS:
            raise ExpertParallelError(f"dispatch must be one of {DISPATCHERS}, got {dispatch!r}")
        if dispatch == "auto":
            dispatch = "fixed" if layer.router == "moge" else "variable"
        if dispatch == "fixed" and layer.router != "moge":
            raise ExpertParallelError(f"the fixed-split dispatch needs the MoGE router (every token reaches every "
                                      f"group equally); router={layer.router!r} needs dispatch='variable'")
        for name in ("hidden_size", "num_experts", "top_k", "num_groups", "router", "topk_groups",
                     "aux_loss_coef", "z_loss_coef"):
            setattr(self, name, getattr(layer, name))
        self.group, self.rank, self.world_size, self.dispatch = group, rank, world, dispatch
        self.gate, self.router_scale, self.shared_expert = layer.gate, layer.router_scale, layer.shared_expert
        full = layer.experts
        n_local = full.num_experts // world
        with torch.device("meta"):
            self.experts = SwiGLUExperts(n_local, full.hidden_size, full.intermediate_size, backend=full.backend)
        block = slice(rank * n_local, (rank + 1) * n_local)
        self.experts.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[block].clone(),
                                                 requires_grad=full.gate_up_proj.requires_grad)
        self.experts.down_proj = nn.Parameter(full.down_proj.detach()[block].clone(),
                                              requires_grad=full.down_proj.requires_grad)

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank owns."""
        n_local = self.experts.num_experts
        return range(self.rank * n_local, (self.rank + 1) * n_local)

    def forward(self, x: Tensor, backend: str | None = None,
                with_stats: bool = True) -> tuple[Tensor, RouterStats | None]:
        """``x [..., H]`` (this rank's tokens) ``-> (y [..., H], RouterStats of these tokens or None)``."""
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        r = self.route(x_TH)
        fn = get_experts_backend(backend or self.experts.backend, x.device)
        moe = fixed_split_moe if self.dispatch == "fixed" else variable_split_moe
        y_TH = moe(x_TH, r.weights, r.expert_ids, self.experts, fn, self.rank, self.world_size, self.group)
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared_expert(x_TH)  # ungated, replicated
        return y_TH.view(shape), self.stats(r) if with_stats else None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, "
                f"experts={self.local_experts.start}..{self.local_experts.stop - 1}, dispatch={self.dispatch!r}")


def apply_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None, dispatch: str = "auto") -> nn.Module:
    """Shard every :class:`MoGELayer` in ``module`` (or ``module`` itself) over ``group``; returns the result.

    Each layer is replaced in place by an :class:`ExpertParallelMoGELayer` holding this rank's
    contiguous block of whole expert groups; everything else stays replicated. Every rank must call it
    with identically initialised weights (same seed or the same loaded checkpoint). With a group of
    one rank (or no initialised process group) the module is returned unchanged.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return module
    if isinstance(module, ExpertParallelMoGELayer):
        raise ExpertParallelError("module is already expert-parallel")
    if isinstance(module, MoGELayer):
        return ExpertParallelMoGELayer(module, group, dispatch)
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, MoGELayer)]
    if any(isinstance(m, ExpertParallelMoGELayer) for _, m in targets):
        raise ExpertParallelError("module already contains expert-parallel layers")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, ExpertParallelMoGELayer(layer, group, dispatch))
    return module

