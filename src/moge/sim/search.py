"""Model-configuration search (docs/design.md section 7.6): sweep MoGE shapes, keep those within a total-parameter
range, find for each the decode batch that maximises throughput per card under a per-token latency limit
and memory capacity, and rank by that throughput.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

from ..config import ConfigError, MoGEConfig
from ..progress import progress
from .hardware import HardwareProfile, get_profile
from .perf import MemoryFitError, PerfError, default_kv_cache, param_counts, simulate


DEFAULT_LATENCY_MS = {"ascend-800i-a2": 50.0, "ascend-300i-duo": 100.0}


@dataclass
class Candidate:
    """One swept shape and its best operating point."""

    config: MoGEConfig
    total_b: float
    activated_b: float
    batch: int = 0
    step_ms: float = 0.0
    tokens_per_s_per_card: float = 0.0

    def to_dict(self) -> dict:
        c = self.config
        return {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "num_experts": c.num_experts, "num_groups": c.groups, "num_experts_per_tok": c.num_experts_per_tok,
                "moe_intermediate_size": c.moe_intermediate_size,
                "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
                "total_params_b": self.total_b, "activated_params_b": self.activated_b, "batch": self.batch,
                "step_ms": self.step_ms, "tokens_per_s_per_card": self.tokens_per_s_per_card}


def best_batch(config: MoGEConfig, hw: HardwareProfile, cards: int, context: int, latency_ms: float,
               weights: str, kv_cache: str, router: str, max_batch: int) -> tuple[int, float, float]:
    """Largest decode batch meeting the latency limit and memory (step time grows with batch, so the
    feasible set is an interval from 1): returns ``(batch, step_ms, tokens/s per card)``, batch 0 if none."""
    def step(b: int) -> float | None:
        try:
            r = simulate(config, hw, cards, "decode", b, context, weights, router, kv_cache=kv_cache)
        except MemoryFitError:
            return None
        return r.step_ms if r.step_ms <= latency_ms else None

    first = step(1)
    if first is None:
        return 0, 0.0, 0.0
    lo, lo_ms, hi = 1, first, max_batch + 1       # lo feasible, hi infeasible (or past the cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ms = step(mid)
        if ms is None:
            hi = mid
        else:
            lo, lo_ms = mid, ms
    return lo, lo_ms, lo / (lo_ms / 1e3) / cards


def candidates(args: argparse.Namespace) -> list[Candidate]:
    """Every valid shape of the sweep whose total parameters fall in the requested range."""
    out = []
    for h, nl, nq, nkv, n, m, f in itertools.product(args.hidden, args.layers, args.q_heads, args.kv_heads,
                                                     args.experts, args.groups, args.expert_ffn):
        if nq % nkv or n % m:
            continue
        try:
            cfg = MoGEConfig(vocab_size=args.vocab, hidden_size=h, num_hidden_layers=nl, num_attention_heads=nq,
                             num_key_value_heads=nkv, head_dim=args.head_dim, num_experts=n,
                             num_experts_per_tok=m, num_groups=m, moe_intermediate_size=f,
                             shared_expert_intermediate_size=4 * f, router=args.router)
        except ConfigError:
            continue
        pc = param_counts(cfg)
        total = pc["total"] / 1e9
        if args.params_min <= total <= args.params_max:
            out.append(Candidate(cfg, total, pc["activated"] / 1e9))
    return out


def run_search(args: argparse.Namespace) -> int:
    """CLI entry of ``moge simulate search``."""
    for flag, v, low in (("--cards", args.cards, 1), ("--context", args.context, 1), ("--max-batch", args.max_batch, 1),
                         ("--top", args.top, 1)):
        if v < low:
            raise PerfError(f"{flag} must be >= {low}, got {v}")
    if args.latency_ms is not None and not args.latency_ms > 0:
        raise PerfError(f"--latency-ms must be > 0, got {args.latency_ms}")
    if not 0 < args.params_min <= args.params_max:
        raise PerfError(f"--params-min/--params-max must satisfy 0 < min <= max, got {args.params_min}, {args.params_max}")
    hw = get_profile(args.hardware, args.calibration)
    args.kv_cache = args.kv_cache or default_kv_cache(args.weights)
    latency = args.latency_ms or DEFAULT_LATENCY_MS.get(hw.name, 50.0)
    cands = candidates(args)
    if not cands:
        raise PerfError(f"no shape in the sweep has {args.params_min}-{args.params_max}B total parameters")
    feasible = []
    bar = progress(len(cands), "search", "shape", mininterval=0.5, leave=False)
    for cand in cands:
        bar.update(1)
        try:
            b, ms, tps = best_batch(cand.config, hw, args.cards, args.context, latency, args.weights,
                                    args.kv_cache, args.router, args.max_batch)
        except PerfError:
            continue  # layout impossible for this shape (e.g. heads not divisible by TP)
        if b:
            cand.batch, cand.step_ms, cand.tokens_per_s_per_card = b, ms, tps
            feasible.append(cand)
    bar.close()
    feasible.sort(key=lambda c: -c.tokens_per_s_per_card)
    top = feasible[:args.top]
    if args.json:
        print(json.dumps({"hardware": hw.name, "cards": args.cards, "latency_ms": latency, "context": args.context,
                          "weights": args.weights, "swept": len(cands), "feasible": len(feasible),
                          "top": [c.to_dict() for c in top]}))
        return 0
    print(f"{len(cands)} shapes with {args.params_min:g}-{args.params_max:g}B parameters, {len(feasible)} meet "
          f"{latency:g} ms/token on {args.cards} x {hw.name} ({args.weights} weights, {args.kv_cache} KV, "
          f"context {args.context}); top {len(top)} by decode tokens/s per card:")
    print(f"{'#':>3}{'hidden':>7}{'layers':>7}{'q':>4}{'kv':>4}{'N':>4}{'M':>3}{'F':>6}{'total B':>9}{'active B':>9}"
          f"{'batch':>7}{'ms/step':>9}{'tok/s/card':>12}")
    for i, c in enumerate(top, 1):
        g = c.config
        print(f"{i:>3}{g.hidden_size:>7}{g.num_hidden_layers:>7}{g.num_attention_heads:>4}{g.num_key_value_heads:>4}"
              f"{g.num_experts:>4}{g.groups:>3}{g.moe_intermediate_size:>6}{c.total_b:>9.2f}{c.activated_b:>9.2f}"
              f"{c.batch:>7}{c.step_ms:>9.1f}{c.tokens_per_s_per_card:>12.1f}")
    return 0
