"""Route random tokens with MoGE, top-K and group-limited routers and print their device balance.

A quick look at what MoGE guarantees: every device (group) gets exactly T*K' token-expert pairs, so
the Imbalance Score is 0 for every batch, while top-K's is almost never 0.
"""

from __future__ import annotations

import argparse

from ..errors import MoGEError
from ..metrics import balance_from_counts
from ..routing import expert_counts, group_limited_route, moge_route, topk_route
from ..validate import check_memory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=64, help="routed experts N")
    p.add_argument("--k", type=int, default=8, help="experts per token K")
    p.add_argument("--groups", type=int, default=8, help="groups M (= devices)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per batch")
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch


    n, k, m = args.experts, args.k, args.groups
    if min(n, k, m, args.tokens, args.batches) < 1:
        raise MoGEError("--experts, --k, --groups, --tokens and --batches must all be positive")
    if n % m or k % m or k // m > n // m:
        raise MoGEError(f"MoGE needs --experts={n} and --k={k} divisible by --groups={m}, with K/M <= N/M")
    if not 0 <= args.seed < 2 ** 63:
        raise MoGEError(f"--seed must be in [0, 2^63), got {args.seed}")
    # the random logits of every batch at once, plus the router's float32 scores and sort of one batch
    check_memory(4 * args.batches * args.tokens * n + 16 * args.tokens * n,
                 f"--batches {args.batches} x --tokens {args.tokens} x --experts {n}")
    g = torch.Generator().manual_seed(args.seed)
    routers = {
        "moge": lambda z: moge_route(z, m, k // m),
        "topk": lambda z: topk_route(z, k),
        "group_limited": lambda z: group_limited_route(z, k, m, max(1, m // 2)),
    }
    print(f"N={n} K={k} M={m} (devices), {args.tokens} tokens/batch, {args.batches} random batches")
    print(f"{'router':<14}{'P(IS>0)':>10}{'mean IS':>10}{'max/mean load':>15}")
    logits = torch.randn(args.batches, args.tokens, n, generator=g)
    for name, route in routers.items():
        imb, is_sum, mm_sum = 0, 0.0, 0.0
        for b in range(args.batches):
            _, ids = route(logits[b])
            is_b, mm_b = balance_from_counts(expert_counts(ids, n), m, args.tokens).tolist()
            imb += is_b > 0
            is_sum += is_b
            mm_sum += mm_b
        print(f"{name:<14}{imb / args.batches:>10.3f}{is_sum / args.batches:>10.3f}{mm_sum / args.batches:>15.3f}")
    return 0
