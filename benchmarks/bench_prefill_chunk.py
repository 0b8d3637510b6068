"""Benchmark chunked prefill: what a long prompt's arrival costs the requests already decoding, by chunk size.

The continuous-batching scheduler (what ``moge serve`` runs) reads a prompt ``--prefill-chunk`` tokens
per engine step, each step also decoding one token for every running request. A long prompt read in
one step stalls the running requests for its whole prefill; read in chunks, the stall is spread over
several steps. Measured in this process on the scheduler itself (no HTTP, so the numbers are the
engine's, not the network's): ``--running`` requests with ``--prompt-len``-token prompts decode
``--output-len`` tokens each; after ``--arrive-step`` steps a ``--long-len``-token prompt arrives
(one output token). Per chunk size, interleaved over ``--rounds`` rounds (the best round per
metric kept, the machine is shared): the running requests' inter-token latency (largest and p50),
their TPOT (per request: (last - first token) / (n - 1), the largest), and the long prompt's TTFT.

Model: the ``small`` preset's layer shapes (H=768, 64 experts in 8 groups, K=8, V=32000) with
``--layers`` layers (4 by default, to keep the run short), random weights, float32.

Usage: ``python benchmarks/bench_prefill_chunk.py [--rounds 2] [--no-write]``; writes the
``## Chunked prefill (bench_prefill_chunk.py)`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from moge.config import get_config  # noqa: E402
from moge.engine.request import SamplingParams  # noqa: E402
from moge.engine.scheduler import Scheduler  # noqa: E402
from moge.model import MoGEForCausalLM  # noqa: E402
from results_md import machine, replace_section  # noqa: E402

SECTION = "## Chunked prefill (bench_prefill_chunk.py)"


def one_run(model, args, chunk: int) -> dict:
    """The running requests' token times and the long prompt's TTFT with one chunk size."""
    rng = random.Random(0)
    vocab = model.config.vocab_size
    short = [[1] + [rng.randrange(3, vocab) for _ in range(args.prompt_len - 1)] for _ in range(args.running)]
    long = [1] + [rng.randrange(3, vocab) for _ in range(args.long_len - 1)]
    sched = Scheduler(model, max_batch=args.running + 1, max_model_len=args.long_len + 8, prefill_chunk=chunk)
    times: dict[int, list[float]] = {i: [] for i in range(args.running)}
    first: list[float] = []
    for i, p in enumerate(short):
        sched.submit(p, SamplingParams(max_tokens=args.output_len, ignore_eos=True),
                     lambda ev, i=i: times[i].append(time.perf_counter()) if ev.token is not None else None)
    step, arrived = 0, 0.0
    while sched.has_work():
        if step == args.arrive_step:
            arrived = time.perf_counter()
            sched.submit(long, SamplingParams(max_tokens=1), lambda ev: first.append(time.perf_counter()))
        sched.step()
        step += 1
    gaps = sorted(b - a for t in times.values() for a, b in zip(t, t[1:]))
    return {"itl_max_ms": gaps[-1] * 1e3, "itl_p50_ms": gaps[len(gaps) // 2] * 1e3,
            "tpot_max_ms": max((t[-1] - t[0]) / (len(t) - 1) for t in times.values()) * 1e3,
            "long_ttft_ms": (first[0] - arrived) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--running", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--long-len", type=int, default=2048)
    p.add_argument("--arrive-step", type=int, default=12)
    p.add_argument("--chunks", type=int, nargs="+", default=[4096, 512, 128])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MoGEForCausalLM(get_config("small", num_hidden_layers=args.layers)).eval()
    one_run(model, args, args.chunks[-1])  # warm kernels and measured choices
    best: dict[int, dict] = {}
    for _ in range(args.rounds):
        for chunk in args.chunks:
            r = one_run(model, args, chunk)
            print(chunk, {k: round(v, 1) for k, v in r.items()}, flush=True)
            old = best.setdefault(chunk, r)
            for k, v in r.items():
                old[k] = min(old[k], v)
    lines = [SECTION, "",
             f"Machine: {machine()}. Shared with other jobs while it ran: numbers are noisy (best of {args.rounds} "
             f"interleaved rounds per metric). The scheduler in-process (no HTTP), `small` preset shapes with "
             f"{args.layers} layers, random weights, float32: {args.running} requests ({args.prompt_len}-token "
             f"prompts, {args.output_len} output tokens) decoding when a {args.long_len}-token prompt arrives at "
             f"step {args.arrive_step} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             "| --prefill-chunk | running: ITL max ms | ITL p50 ms | TPOT max ms | long prompt: TTFT ms |",
             "|---|---|---|---|---|"]
    for chunk in args.chunks:
        r = best[chunk]
        lines.append(f"| {chunk} | {r['itl_max_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['tpot_max_ms']:.1f} | "
                     f"{r['long_ttft_ms']:.0f} |")
    lines += ["", "Chunking bounds the longest gap the running requests see (the stall of one step that reads "
              "the whole long prompt); it does not lower their TPOT, since the prefill's work is the same, "
              "only spread over more steps (each chunk re-reads the prompt's earlier keys), and the long "
              "prompt's own TTFT grows with the number of steps it takes.", ""]
    print("\n".join(lines))
    if not args.no_write:
        replace_section(HERE / "RESULTS.md", SECTION, lines)


if __name__ == "__main__":
    main()
