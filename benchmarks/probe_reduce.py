"""The kernel measurements behind the compiled decode step (docs/inference.md, "The compiled step"), in one
run on the machine at hand: one-row products through ``F.linear`` against the compiled multiply-and-sum
(``moge.experts.reduce.reduce_linear``), the routed experts of 12 ``small`` layers at one token through the
eager ``gemv`` backend against the compiled ``reduce`` backend, and decode attention (batch 16, 12 heads
over 4 key/value heads, 128 slots, bf16) through SDPA against ``decode_attention``.

Weights are read cold: each measurement cycles through a pool of copies larger than the caches.
GB/s are weight bytes over time, best of ``--rounds``. Usage: ``python benchmarks/probe_reduce.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from moge.experts import gemv_experts, reduce_experts, reduce_linear  # noqa: E402
from moge.model.attention import decode_attention  # noqa: E402


def best_time(fn, calls: list, rounds: int) -> float:
    """Seconds per call of ``fn(*args)`` over ``calls``, best of ``rounds`` passes (one warm pass first)."""
    for args in calls[:2]:
        fn(*args)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for args in calls:
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / len(calls))
    return best


def linears(rounds: int) -> None:
    compiled = torch.compile(reduce_linear, dynamic=False)
    for o, i in ((2048, 768), (32000, 768)):
        for dt in (torch.float32, torch.bfloat16):
            pool = [torch.randn(o, i).to(dt) for _ in range(max(2, int(256e6 // (o * i * 4))))]
            x = torch.randn(1, i).to(dt)
            calls = [(x, w) for w in pool]
            nbytes = o * i * pool[0].element_size()
            eager = best_time(F.linear, calls, rounds)
            red = best_time(compiled, calls, rounds)
            print(f"linear [{o}, {i}] {str(dt)[6:]:8s} 1 row: F.linear {nbytes / eager / 1e9:5.1f} GB/s, "
                  f"compiled reduce {nbytes / red / 1e9:5.1f} GB/s", flush=True)


def experts(rounds: int) -> None:
    n, h, f, k, layers = 64, 768, 256, 8, 12
    weights = [(torch.randn(n, 2 * f, h) * 0.02, torch.randn(n, h, f) * 0.02) for _ in range(layers)]
    compiled = torch.compile(reduce_experts, dynamic=False)
    x, w = torch.randn(1, h), torch.rand(1, k)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randperm(n, generator=g)[:k].view(1, k) for _ in range(layers)]
    calls = [(x, i, w, gu, dn) for i, (gu, dn) in zip(ids, weights)]
    for name, fn in (("eager gemv", gemv_experts), ("compiled reduce", compiled)):
        t = best_time(fn, calls, rounds) * layers
        print(f"routed experts, 12 layers, 1 token, fp32: {name} {t * 1e3:.2f} ms "
              f"({layers * k * 3 * f * h * 4 / t / 1e9:.1f} GB/s)", flush=True)


def attention(rounds: int) -> None:
    b, heads, kv, slots, d = 16, 12, 4, 128, 64
    q = torch.randn(b, heads, 1, d).bfloat16()
    k, v = torch.randn(b, kv, slots, d).bfloat16(), torch.randn(b, kv, slots, d).bfloat16()
    mask = torch.ones(b, 1, 1, slots, dtype=torch.bool)

    def sdpa(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    calls = [(q, k, v, mask)] * 50
    for name, fn in (("SDPA", sdpa), ("decode_attention", decode_attention)):
        print(f"decode attention, batch 16, 128 slots, bf16: {name} {best_time(fn, calls, rounds) * 1e3:.3f} ms",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        linears(args.rounds)
        experts(args.rounds)
        attention(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
