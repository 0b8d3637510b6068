"""Small reductions a distributed trainer needs besides FSDP2: the mean of a logged scalar over ranks.

Gradient averaging and clipping are FSDP2's and :func:`moge.parallel.fsdp.clip_grad_norm_`'s; sharded
state dicts are DCP's (:mod:`moge.checkpoint.dcp`).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from .comm import rank_and_world


def all_reduce_mean(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself for one process), e.g. for logging losses."""
    _, world = rank_and_world(group)
    if world == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, group=group)
    return out / world
