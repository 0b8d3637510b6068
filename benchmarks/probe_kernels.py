"""How fast this CPU's matmul kernels stream weights at decode sizes, against a plain read.

Decode reads every weight once, so a step is bound by whichever is slower: memory or the kernel's
weight-streaming rate. This prints both for the shapes of the ``small`` preset's experts: the copy
bandwidth ``bench_generate.py``'s bound divides by, then GB/s of weight bytes for a pure read (``sum``), one large matrix-vector product, 200 distinct ``[512, 768]``
weights (larger than the caches together, as in a step) through ``F.linear``, ``W @ x^T`` and
oneDNN's packed linear, in float32 and bfloat16 at 1 and 8 rows, and ``torch._int_mm`` (the int8
product of W8A8). Backs the notes on kernel ceilings in ``benchmarks/RESULTS.md``; prints only.

Usage: ``python benchmarks/probe_kernels.py [--threads 2]``
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_decode_experts import best_ms  # benchmarks/ is on sys.path: the script's folder
from results_md import copy_bandwidth


def best_s(fn, repeats: int = 10) -> float:
    return best_ms(fn, repeats) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"copy (read + written, 256 MiB)        {copy_bandwidth() / 1e9:6.1f} GB/s  (bench_generate's bound uses this)")
    a = torch.randn(64 * 1024 * 1024)
    print(f"read (sum of 256 MiB)                 {a.numel() * 4 / best_s(a.sum) / 1e9:6.1f} GB/s")
    big, v = torch.randn(32768, 768), torch.randn(768)
    print(f"one mv, 96 MiB float32                {big.numel() * 4 / best_s(lambda: torch.mv(big, v)) / 1e9:6.1f} GB/s")
    del a, big
    ws = [torch.randn(512, 768) for _ in range(200)]
    int8 = [w.mul(20).clamp(-127, 127).to(torch.int8) for w in ws]
    for rows in (1, 8):
        x = torch.randn(rows, 768)
        xq = x.mul(40).clamp(-127, 127).to(torch.int8)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
        cands = {  # name: (weights, input, product, bytes per weight element)
            "F.linear float32": (ws, x, F.linear, 4),
            "W @ x^T float32": (ws, x, lambda x, w: (w @ x.t()).t(), 4),
            "oneDNN packed float32": (packed, x, lambda x, w: torch.ops.mkldnn._linear_pointwise(
                x, w, None, "none", [], ""), 4),
            "F.linear bfloat16": ([w.bfloat16() for w in ws], x.bfloat16(), F.linear, 2),
            "torch._int_mm int8 (W8A8)": (int8, xq, lambda x, w: torch._int_mm(x, w.t()), 1),
        }
        for name, (weights, xx, fn, elem) in cands.items():
            dt = best_s(lambda: [fn(xx, w) for w in weights], repeats=5)
            print(f"{rows} row(s), 200 weights, {name:26s} {len(ws) * ws[0].numel() * elem / dt / 1e9:6.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
