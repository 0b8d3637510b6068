"""Gradients and state dicts of expert-parallel models.

Shape legend
    N  routed experts (global)    L  experts per rank (N/E)    E  ranks in the expert-parallel group

Expert-sharded tensors are exactly those named ``...experts.gate_up_proj`` / ``...experts.down_proj``
(optionally followed by a suffix such as an optimizer-state key); they are split on dim 0 into E
contiguous blocks of L experts. Every other tensor is replicated. Names are the single-device names,
so a checkpoint looks the same whatever the expert-parallel size.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import rank_and_world
from .expert_parallel import ExpertParallelError, is_expert_parallel

_SHARDED = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)($|\.)")


def is_expert_sharded(name: str) -> bool:
    """Whether the tensor called ``name`` is split by expert under expert parallelism."""
    return _SHARDED.search(name) is not None


def _sharded_param_names(model: nn.Module) -> set[str]:
    names = set()
    for prefix, m in model.named_modules():
        if is_expert_parallel(m):
            pre = f"{prefix}." if prefix else ""
            names |= {f"{pre}experts.{p}" for p, _ in m.experts.named_parameters()}
    return names


def sync_gradients(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Average gradients over ranks so that EP=E training equals EP=1 training on the global batch.

    Assumes each rank's loss is a mean over its own equally many tokens, so the global loss is the
    mean of the rank losses. Replicated parameters (router, shared expert, attention, embeddings...)
    are all-reduced and divided by E. An expert shard already received the gradient of *every* rank's
    loss through the reverse all-to-all, so it is only divided by E. Missing gradients of replicated
    parameters count as zeros so that every rank joins the same collective.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return
    sharded = {id(p) for m in model.modules() if is_expert_parallel(m) for p in m.experts.parameters()}
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in sharded:
            if p.grad is not None:
                p.grad.div_(world)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    # One all-reduce per dtype/device: far fewer round trips than one per parameter.
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None) -> Tensor:
    """Global gradient-norm clipping of an expert-parallel model (call after :func:`sync_gradients`).

    The norm is the one the unsharded model would have: replicated gradients (equal on every rank)
    count once, expert shards are summed over ranks. Returns the total norm before clipping, like
    ``torch.nn.utils.clip_grad_norm_``, which it equals for a single process. Costs one scalar
    all-reduce and no host sync.
    """
    _, world = rank_and_world(group)
    params = [p for p in model.parameters() if p.grad is not None]
    if world == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = {id(p) for m in model.modules() if is_expert_parallel(m) for p in m.experts.parameters()}
    device = params[0].grad.device if params else torch.device("cpu")
    shard_sq = torch.zeros((), dtype=torch.float32, device=device)
    repl_sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        sq = p.grad.detach().float().square().sum()
        if id(p) in sharded:
            shard_sq += sq
        else:
            repl_sq += sq
    dist.all_reduce(shard_sq, group=group)
    total = (shard_sq + repl_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total


def all_reduce_mean(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself for one process), e.g. for logging losses."""
    _, world = rank_and_world(group)
    if world == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, group=group)
    return out / world


def shard_named_tensor(name: str, full: Tensor, rank: int, world: int) -> Tensor:
    """This rank's part of the unsharded tensor ``name``: its expert block if sharded, else ``full``."""
    if world == 1 or not is_expert_sharded(name):
        return full
    if full.dim() == 0 or full.shape[0] % world:
        raise ExpertParallelError(f"{name}: cannot split {tuple(full.shape)} into {world} expert blocks "
                                  f"(dim 0 must be divisible by the expert-parallel size)")
    n_local = full.shape[0] // world
    return full[rank * n_local:(rank + 1) * n_local]


def gather_named_tensor(name: str, local: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The unsharded tensor ``name`` from every rank's part (a collective: all ranks must call it)."""
    _, world = rank_and_world(group)
    if world == 1 or not is_expert_sharded(name):
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=0)


def full_state_dict(model: nn.Module, group: dist.ProcessGroup | None) -> dict[str, Tensor]:
    """The unsharded state dict with single-device names, identical on every rank (a collective).

    Expert shards are all-gathered in rank order; replicated tensors are this rank's own (they are
    equal on every rank after :func:`sync_gradients`-based training). Write it from rank 0 only.
    """
    sharded = _sharded_param_names(model)
    out = {}
    for name, t in model.state_dict().items():
        out[name] = gather_named_tensor(name, t, group) if name in sharded else t
    return out


def load_full_state_dict(model: nn.Module, full_sd: dict[str, Tensor], group: dist.ProcessGroup | None) -> None:
    """Load an unsharded state dict into an expert-parallel (or single-device) model.

    Each rank keeps its own block of every expert tensor and all replicated tensors. Missing or
    unexpected keys raise an error naming them.
    """
    rank, world = rank_and_world(group)
    sharded = _sharded_param_names(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(full_sd))
    unexpected = sorted(set(full_sd) - set(own))
    if missing or unexpected:
        raise ExpertParallelError(f"state dict does not match the model: missing {missing[:8]}"
                                  f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                                  f"{'...' if len(unexpected) > 8 else ''}")
    local = {name: shard_named_tensor(name, full_sd[name], rank, world) if name in sharded else full_sd[name]
             for name in own}
    model.load_state_dict(local, strict=True)
