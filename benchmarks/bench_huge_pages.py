"""Huge pages against ordinary pages for what a CPU decode step reads, in one interleaved run.

Two measurements, each alternating the two placements round by round (A, B, A, B) so that the
machine's drifting bandwidth hits both alike:

* the read rate of ``x.sum()`` over 512 MiB, on ordinary 4 KiB pages (torch's allocator) and on
  transparent huge pages (``moge.memory.huge_pages_zeros``);
* the decode step of the ``small`` preset (random weights, 128-token context) at ``--batches``, eager
  (``DecodeStep``) and compiled (``DecodeStep(compile=True)``), on two copies of one model: weights and
  KV cache on ordinary pages, and the same moved to huge pages (``moge.memory.move_to_huge_pages``, what
  ``load_pretrained`` does on a CPU). Both copies give the same greedy tokens (checked).

Results: ``benchmarks/RESULTS.md`` ("Huge pages") and ``benchmarks/results_huge_pages.png``. Usage:
``python benchmarks/bench_huge_pages.py [--threads 2] [--rounds 5] [--dtypes bfloat16 float32] [--batches 1 16]``.
Without huge pages on the machine (``moge.memory.huge_page_policy()`` is ``never`` or absent) it says so
and stops.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from results_md import machine, replace_section  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

from moge.config import get_config  # noqa: E402
from moge.engine.step import DecodeStep, prefill  # noqa: E402
from moge.memory import huge_page_bytes, huge_page_policy, huge_pages_zeros, move_to_huge_pages  # noqa: E402
from moge.model import MoGEForCausalLM  # noqa: E402
from moge.model.cache import StaticKVCache  # noqa: E402


CONTEXT, NEW = 128, 16


def read_rates(rounds: int) -> dict[str, float]:
    """Best GB/s of ``x.sum()`` over 512 MiB on each placement, alternating ``4 * rounds`` times."""
    small = torch.ones(128 * 2**20)
    huge = huge_pages_zeros([(128 * 2**20,)], torch.float32)[0].fill_(1)
    best = {"ordinary": 0.0, "huge": 0.0}
    for _ in range(4 * rounds):
        for name, x in (("ordinary", small), ("huge", huge)):
            t0 = time.perf_counter()
            x.sum()
            best[name] = max(best[name], x.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def ordinary_cache(model, batch: int) -> StaticKVCache:
    """A KV cache for ``model`` with its planes on ordinary pages (clones from torch's allocator)."""
    cache = StaticKVCache.for_model(model, batch, CONTEXT + NEW)
    cache.keys = [k.clone() for k in cache.keys]
    cache.values = [v.clone() for v in cache.values]
    return cache


def steps_for(models: dict, batch: int, compiled: bool) -> dict:
    """``{placement: (step, cache)}`` with the same prompt prefilled into each placement's cache."""
    prompt = torch.randint(3, 32000, (batch, CONTEXT), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model in models.items():
        if name == "ordinary":
            cache = ordinary_cache(model, batch)
        else:
            cache = StaticKVCache.for_model(model, batch, CONTEXT + NEW)
        prefill(model, cache, prompt, kv_len=CONTEXT)
        out[name] = (DecodeStep(model, cache, compile=compiled), cache)
    return out


def time_steps(steps: dict, batch: int, rounds: int) -> dict[str, float]:
    """Best ms per step of each placement over ``rounds`` interleaved rounds of :data:`NEW` steps."""
    ids = torch.randint(3, 32000, (batch, 1), generator=torch.Generator().manual_seed(1))
    tokens = {}
    for name, (step, cache) in steps.items():  # warm up (compiles once: both copies share the graph)
        tokens[name] = step(ids)[0].argmax(-1)
        cache.lengths_B.sub_(1)
    if not torch.equal(tokens["ordinary"], tokens["huge"]):
        raise SystemExit("the two placements disagree on the greedy tokens")
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, (step, cache) in steps.items():
            t0 = time.perf_counter()
            for _ in range(NEW):
                step(ids)
            best[name] = min(best[name], (time.perf_counter() - t0) / NEW * 1e3)
            cache.lengths_B.sub_(NEW)
    return best


def plot(rows: list[dict], rates: dict[str, float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = ["x.sum() 512 MiB"] + [f"{r['dtype']} b{r['batch']} {r['mode']}" for r in rows]
    gains = [rates["huge"] / rates["ordinary"]] + [r["ordinary"] / r["huge"] for r in rows]
    ax.barh(labels[::-1], gains[::-1], color="#4c72b0")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed on huge pages / on ordinary pages (>1: huge pages faster)")
    ax.set_title("Huge pages vs 4 KiB pages, one interleaved run", fontsize=10)
    for i, g in enumerate(gains[::-1]):
        ax.text(g, i, f" {g:.2f}x", va="center", fontsize=8)
    ax.set_xlim(0, max(gains) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if huge_page_policy() in (None, "never"):
        print(f"no transparent huge pages here (policy: {huge_page_policy()}); nothing to compare")
        return 0
    rates = read_rates(args.rounds)
    print(f"read x.sum() 512 MiB: ordinary {rates['ordinary']:.1f} GB/s, huge {rates['huge']:.1f} GB/s", flush=True)
    rows = []
    with torch.inference_mode():
        for dt_name in args.dtypes:
            torch.manual_seed(0)
            ordinary = MoGEForCausalLM(get_config("small")).to(getattr(torch, dt_name)).eval()
            huge = copy.deepcopy(ordinary)
            before = huge_page_bytes()
            moved = move_to_huge_pages(huge)
            print(f"{dt_name}: moved {moved / 2**20:.0f} MiB, {(huge_page_bytes() - before) / 2**20:.0f} MiB "
                  f"now on huge pages", flush=True)
            for batch in args.batches:
                for mode, compiled in (("eager", False), ("compiled", True)):
                    steps = steps_for({"ordinary": ordinary, "huge": huge}, batch, compiled)
                    best = time_steps(steps, batch, args.rounds)
                    rows.append(dict(dtype=dt_name, batch=batch, mode=mode, **best))
                    print(f"{dt_name} batch {batch} {mode}: ordinary {best['ordinary']:.2f} ms/step, huge "
                          f"{best['huge']:.2f} ({best['ordinary'] / best['huge']:.2f}x)", flush=True)
    if args.no_write:
        return 0
    plot(rows, rates, HERE / "results_huge_pages.png")
    body = [
        "## Huge pages",
        "",
        f"`benchmarks/bench_huge_pages.py`, machine: {machine()}; THP policy `{huge_page_policy()}`. One run, the",
        "two placements alternating round by round (A, B, A, B), best of "
        f"{args.rounds} rounds; `small` preset, {CONTEXT}-token context, {NEW} steps per round.",
        "Ordinary = torch's allocator (4 KiB pages); huge = `moge.memory` (what `load_pretrained` does on a CPU),",
        "weights and KV cache. Same weights in both, same greedy tokens (checked).",
        "",
        f"Read rate, `x.sum()` over 512 MiB: ordinary {rates['ordinary']:.1f} GB/s, huge {rates['huge']:.1f} GB/s "
        f"({rates['huge'] / rates['ordinary']:.2f}x).",
        "",
        "| dtype | batch | step | ordinary ms/step | huge ms/step | speed-up |",
        "|---|---:|---|---:|---:|---:|",
        *[f"| {r['dtype']} | {r['batch']} | {r['mode']} | {r['ordinary']:.2f} | {r['huge']:.2f} | "
          f"{r['ordinary'] / r['huge']:.2f}x |" for r in rows],
        "",
        "![huge pages](results_huge_pages.png)",
        "",
    ]
    replace_section(HERE / "RESULTS.md", "## Huge pages", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
