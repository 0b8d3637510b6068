"""Routed experts at decode sizes on CPU: every backend, and ``gemv`` with each few-rows kernel forced.

Model: 12 ``small``-preset MoGE layers (H=768, 64 experts in 8 groups, K=8, F=256), random weights
(seed 0), each layer's own weights, so a pass over the 12 layers streams ~12 x the touched experts'
bytes, as a decode step does and unlike a loop over one hot weight. Per token count T (1 and 8 by
default): one input per layer, routed once; a round runs the 12 layers' experts; after 3 warm-up
rounds (which also let ``auto`` finish timing its first real calls), the best of ``--repeats`` rounds
is kept. Prints ms per 12 layers, the weight stream rate (touched experts' bytes / time) and each
contender's ratio to ``auto``. Backs the decode numbers in ``moge/experts/gemv.py`` and
``docs/inference.md``; prints only (no RESULTS section).

Usage: ``PYTHONPATH=src python benchmarks/bench_decode_experts.py [--tokens 1 8] [--threads 2]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from moge.experts import KernelChoices, use_kernels  # noqa: E402
from moge.experts import linear as ml  # noqa: E402
from moge.config import get_config  # noqa: E402
from moge.model.moe import MoGELayer  # noqa: E402
from results_md import machine  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

LAYERS = 12


def best_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_config("small")
    layers = [MoGELayer.from_config(cfg).eval() for _ in range(LAYERS)]
    kernels = KernelChoices()  # one owner for all layers, as a model's
    for layer in layers:
        use_kernels(layer, kernels)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # gate, up, down; float32
    print(f"{machine()}; {LAYERS} small-preset layers, float32")
    with torch.inference_mode():
        for t in args.tokens:
            xs = [torch.randn(t, cfg.hidden_size) for _ in layers]
            routes = [layer.route(x) for layer, x in zip(layers, xs)]
            touched = sum(r.expert_ids.unique().numel() for r in routes) / LAYERS
            stream = LAYERS * touched * per_expert

            def run(backend):
                return lambda: [layer.experts(x, r.expert_ids, r.weights, backend=backend)
                                for layer, x, r in zip(layers, xs, routes)]
            rows = {f"auto (gemv/grouped_mm, kernel measured)": best_ms(run("auto"), args.repeats)}
            for name in ("gemv", "grouped_mm", "sorted"):
                rows[name] = best_ms(run(name), args.repeats)
            for kernel in ml.KERNELS:
                kernels.pin("few_rows", kernel)
                rows[f"gemv, few-rows kernel forced to {kernel}"] = best_ms(run("gemv"), args.repeats)
            kernels.pin("few_rows", None)
            ref = next(iter(rows.values()))
            print(f"\nT={t}: {touched:.1f} distinct experts per layer, {stream / 1e6:.0f} MB of expert weights per round")
            for name, ms in rows.items():
                print(f"  {name:44s} {ms:7.1f} ms  {stream / ms / 1e6:5.1f} GB/s  {ms / ref:5.2f}x auto's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
