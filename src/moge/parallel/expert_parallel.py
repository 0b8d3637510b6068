"""Expert parallelism for :class:`moge.model.moe.MoGELayer`: whole expert groups per rank, as dispatchers.

Shape legend
    T  local tokens on this rank       H  hidden size          E  ranks in the expert-parallel group
    N  routed experts (global)         L  experts per rank (N/E, a contiguous block of whole groups)
    K  experts per token               C  choices per token that land on one rank under MoGE (K/E)
    P  token-expert pairs (T*K)        R  rows received by this rank

Rank r owns experts ``r*L ... (r+1)*L - 1``, i.e. groups ``r*M/E ... (r+1)*M/E - 1``. The router
(``gate``, ``router_scale``) and the shared expert are not touched; each rank routes its own tokens.
Expert parallelism is a *dispatcher* installed in the layer's ``dispatcher`` slot (the layer stays a
plain :class:`MoGELayer`; see :func:`install_dispatcher`). Two, kept apart so they can be measured side
by side:

* :class:`ExactSplitDispatcher` / :func:`fixed_split_moe` (MoGE). Every token has exactly C choices on
  every rank and the ids are group-major, so the choices for rank r are the contiguous slice
  ``[:, r*C:(r+1)*C]``. Each token is sent once to every rank together with its C local expert ids
  and gate weights; the receiving rank applies its experts and the gate weights and sends back one
  row per token. Every all-to-all has equal splits known before the call: no count exchange, no host
  sync, static shapes. Only the per-expert offsets inside a rank vary, computed on the device.
* :class:`VariableSplitDispatcher` / :func:`variable_split_moe` (top-K / group-limited). The usual
  dropless dispatch: an all-to-all of per-expert counts, a device-to-host copy of the row counts, then
  variable-size all-to-alls of token rows and of expert outputs.

Both call the experts through the module (``experts(x, ids, w)``), so FSDP2 gathers the rank's expert
block over the data-parallel ranks first when the experts are also sharded with ``fully_shard``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import MoGEError
from ..experts import sort_pairs
from ..model.moe import MoGELayer, Routing
from .comm import all_to_all, rank_and_world

DISPATCHERS = ("auto", "fixed", "variable")


class ExpertParallelError(MoGEError, ValueError):
    """An expert-parallel layout that cannot work (e.g. groups not divisible by ranks)."""


def fixed_split_moe(x_TH: Tensor, w_TK: Tensor, ids_TK: Tensor, experts: nn.Module, backend: str | None,
                    n_local: int, world: int, group: dist.ProcessGroup | None) -> Tensor:
    """Routed-expert output ``[T,H]`` for MoGE routing with equal, precomputed all-to-all splits.

    ``ids_TK`` must be group-major MoGE choices and every rank must hold the same number of local
    tokens T (the static-shape contract). Three all-to-alls forward (tokens, ids+weights, outputs),
    three backward, all with ``None`` splits; nothing is read back to the host.
    """
    t, h = x_TH.shape
    c = ids_TK.shape[1] // world
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
    y_RH = experts(recv_x_RH, recv_ids_RC, recv_w_RC, backend=backend)
    back_RH = all_to_all(y_RH, group=group)                  # block r: my tokens' share from rank r
    return back_RH.view(world, t, h).sum(0)


def variable_split_moe(x_TH: Tensor, w_TK: Tensor, ids_TK: Tensor, experts: nn.Module, backend: str | None,
                       n_local: int, world: int, group: dist.ProcessGroup | None) -> Tensor:
    """Routed-expert output ``[T,H]`` for any routing, with the usual count exchange (the baseline).

    Pairs are sorted by expert (so by destination rank), per-expert counts are exchanged with an
    all-to-all, row counts are copied to the host to size the buffers, and token rows / expert outputs
    move with variable-split all-to-alls. Gate weights are applied back on the token's own rank.
    """
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
    y_RH = experts(recv_x_RH, local_ids_R.unsqueeze(1), ones_R1, backend=backend)
    y_PH = all_to_all(y_RH, in_splits, out_splits, group)
    y_PH = y_PH * w_TK.reshape(-1)[order_P].unsqueeze(-1).to(y_PH.dtype)
    return torch.zeros_like(x_TH).index_add(0, token_P, y_PH)


class _EPDispatcher:
    """Common part of the expert-parallel dispatchers: the group, this rank's place, its expert block."""
    name = ""
    moe = staticmethod(fixed_split_moe)

    def __init__(self, group: dist.ProcessGroup | None, num_experts: int):
        self.group = group
        self.rank, self.world_size = rank_and_world(group)
        self.n_local = num_experts // self.world_size

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank owns."""
        return range(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def __call__(self, x_TH: Tensor, r: Routing, experts: nn.Module, backend: str | None) -> Tensor:
        return self.moe(x_TH, r.weights, r.expert_ids, experts, backend, self.n_local, self.world_size, self.group)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}/{self.world_size}, "
                f"experts={self.local_experts.start}..{self.local_experts.stop - 1})")

    def __deepcopy__(self, memo):  # a process group is a handle, not state: copies share it
        return type(self)(self.group, self.n_local * self.world_size)


class ExactSplitDispatcher(_EPDispatcher):
    """MoGE's exact-size dispatch (:func:`fixed_split_moe`): equal splits, no count exchange, no host sync."""
    name = "fixed"
    moe = staticmethod(fixed_split_moe)


class VariableSplitDispatcher(_EPDispatcher):
    """The count-exchanging dropless dispatch (:func:`variable_split_moe`) any router can use."""
    name = "variable"
    moe = staticmethod(variable_split_moe)


def is_expert_parallel(layer: nn.Module) -> bool:
    """Whether ``layer`` is a :class:`MoGELayer` with an expert-parallel dispatcher installed."""
    return isinstance(layer, MoGELayer) and isinstance(layer.dispatcher, _EPDispatcher)


def make_dispatcher(layer: MoGELayer, group: dist.ProcessGroup | None, dispatch: str = "auto") -> _EPDispatcher:
    """The expert-parallel dispatcher for ``layer`` over ``group`` (checks the layout and the choice).

    ``dispatch`` is ``fixed`` (MoGE, no count exchange), ``variable`` (count exchange) or ``auto``
    (``fixed`` for the MoGE router, ``variable`` otherwise).
    """
    _, world = rank_and_world(group)
    if layer.num_groups % world:
        raise ExpertParallelError(f"expert parallelism shards whole expert groups: num_groups M={layer.num_groups} "
                                  f"must be divisible by the expert-parallel size E={world}")
    if dispatch not in DISPATCHERS:
        raise ExpertParallelError(f"dispatch must be one of {DISPATCHERS}, got {dispatch!r}")
    if dispatch == "auto":
        dispatch = "fixed" if layer.router == "moge" else "variable"
    if dispatch == "fixed" and layer.router != "moge":
        raise ExpertParallelError(f"the fixed-split dispatch needs the MoGE router (every token reaches every "
                                  f"group equally); router={layer.router!r} needs dispatch='variable'")
    cls = ExactSplitDispatcher if dispatch == "fixed" else VariableSplitDispatcher
    return cls(group, layer.num_experts)


def moe_layers(module: nn.Module) -> list[tuple[str, MoGELayer]]:
    """``(name, layer)`` of every :class:`MoGELayer` in ``module`` (``module`` itself included)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoGELayer)]


def apply_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None, dispatch: str = "auto") -> nn.Module:
    """Shard the routed experts of every :class:`MoGELayer` in ``module`` over ``group``; returns ``module``.

    Each layer keeps its class and parameter names: ``experts.gate_up_proj`` now holds this rank's
    contiguous ``[L,2F,H]`` block of whole groups, and an expert-parallel dispatcher is installed.
    Everything else stays replicated (average its gradients with data parallelism). Every rank must
    call it with identically initialised weights (same seed or the same loaded checkpoint). With a
    group of one rank (or no initialised process group) the module is returned unchanged.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return module
    targets = moe_layers(module)
    if any(is_expert_parallel(m) for _, m in targets):
        raise ExpertParallelError("module already contains expert-parallel layers")
    for _, layer in targets:
        d = make_dispatcher(layer, group, dispatch)
        block = slice(d.local_experts.start, d.local_experts.stop)
        ex = layer.experts
        for pname in ("gate_up_proj", "down_proj"):
            full = getattr(ex, pname)
            setattr(ex, pname, nn.Parameter(full.detach()[block].clone(), requires_grad=full.requires_grad))
        ex.num_experts = d.n_local
        layer.dispatcher = d
    return module
