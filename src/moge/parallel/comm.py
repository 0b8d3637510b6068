"""Differentiable all-to-all and small process-group helpers.

Shape legend
    R  rows (first dim) of a buffer exchanged by an all-to-all; trailing dims ride along unchanged.

The backward of an all-to-all is the reverse all-to-all (input and output splits swapped), so
gradients of rows a rank sent come back to it from the rank that used them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on dim 0 whose backward is the reverse all-to-all.

    ``out_splits`` / ``in_splits`` are host lists of row counts, or both ``None`` for equal splits
    (then the output has exactly the input's shape and nothing about sizes is exchanged).
    """

    @staticmethod
    def forward(ctx, x_R: Tensor, out_splits: list[int] | None, in_splits: list[int] | None,
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        x_R = x_R.contiguous()
        rows = x_R.shape[0] if out_splits is None else sum(out_splits)
        out_R = x_R.new_empty((rows, *x_R.shape[1:]))
        # Looked up on the module at call time so tests can observe every call.
        dist.all_to_all_single(out_R, x_R, out_splits, in_splits, group=group)
        return out_R

    @staticmethod
    def backward(ctx, grad_R: Tensor):
        grad_R = grad_R.contiguous()
        rows = grad_R.shape[0] if ctx.in_splits is None else sum(ctx.in_splits)
        grad_in_R = grad_R.new_empty((rows, *grad_R.shape[1:]))
        dist.all_to_all_single(grad_in_R, grad_R, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in_R, None, None, None


def all_to_all(x_R: Tensor, out_splits: list[int] | None = None, in_splits: list[int] | None = None,
               group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 (equal splits when both split lists are ``None``).

    Rows ``sum(in_splits[:j]) ...`` go to rank j; the output holds the rows received from rank 0,
    then rank 1, and so on. Gradients flow back through the reverse exchange.
    """
    if (out_splits is None) != (in_splits is None):
        raise ValueError("give both out_splits and in_splits, or neither (equal splits)")
    return _AllToAll.apply(x_R, out_splits, in_splits, group)
