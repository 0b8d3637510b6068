"""The decode-step measurements behind three choices of moge's CPU decode path, in one run on the machine
at hand (the ``small`` preset, random weights, batch 1, a 128-token context):

* which thread steps the model: an eager float32 step on the thread that built the model and ran it
  first, against the same step on a second thread (why ``moge serve`` does all its torch work on one
  thread, ``moge.serve.engine.EngineThread``);
* decode attention's matmuls for bf16 keys and values: in bf16 against in float32 (what
  ``moge.model.attention.decode_attention`` does), one layer's shapes (12 query and 4 key/value heads),
  compiled as in the compiled step;
* Dynamo's guards: the compiled bf16 step with them against without (what ``DecodeStep(compile=True)``
  does, ``moge.engine.step``), both compiled on the first call, the same weights and cache state.

Each pair alternates round by round (A, B, A, B), best of ``--rounds``. Writes the ``## Decode step
probes (probe_step.py)`` section of ``benchmarks/RESULTS.md`` unless ``--no-write``. Usage:
``python benchmarks/probe_step.py``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from results_md import machine, replace_section  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

from moge.config import get_config  # noqa: E402
from moge.engine.step import DecodeStep, prefill  # noqa: E402
from moge.model import MoGEForCausalLM  # noqa: E402
from moge.model.attention import decode_attention  # noqa: E402
from moge.model.cache import StaticKVCache  # noqa: E402


SECTION = "## Decode step probes (probe_step.py)"
CONTEXT, STEPS = 128, 10


def model_and_cache(dtype: torch.dtype) -> tuple[MoGEForCausalLM, StaticKVCache]:
    torch.manual_seed(0)
    model = MoGEForCausalLM(get_config("small")).to(dtype).eval()
    cache = StaticKVCache.for_model(model, 1, CONTEXT + 2 * STEPS)
    prefill(model, cache, torch.randint(3, 32000, (1, CONTEXT), generator=torch.Generator().manual_seed(0)),
            kv_len=CONTEXT)
    return model, cache


def ms_per_step(step: DecodeStep, cache: StaticKVCache) -> float:
    """ms per call over :data:`STEPS` calls, the cache's lengths restored afterwards."""
    ids = torch.tensor([[5]])
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step(ids)
    cache.lengths_B.sub_(STEPS)
    return (time.perf_counter() - t0) / STEPS * 1e3


def on_second_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def threads(rounds: int) -> tuple[float, float]:
    model, cache = model_and_cache(torch.float32)
    step = DecodeStep(model, cache)
    ms_per_step(step, cache)  # the kernels' first calls (and their measured choices) on this thread
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for _ in range(rounds):
            best[0] = min(best[0], ms_per_step(step, cache))
            best[1] = min(best[1], on_second_thread(lambda: ms_per_step(step, cache)))
    return best[0], best[1]


def attention(rounds: int) -> tuple[float, float]:
    b, heads, kv, slots, d = 1, 12, 4, CONTEXT + 16, 64
    q = torch.randn(b, heads, 1, d).bfloat16()
    k, v = torch.randn(b, kv, slots, d).bfloat16(), torch.randn(b, kv, slots, d).bfloat16()
    mask = torch.ones(b, 1, 1, slots, dtype=torch.bool)

    def bf16_matmuls(q, k, v, m):  # decode_attention's form with the matmuls left in bf16
        q_BgRD = q.reshape(b, kv, heads // kv, d)
        probs = ((q_BgRD @ k.transpose(-1, -2)).float() * d ** -0.5).softmax(-1).to(q.dtype)
        return (probs @ v).view(b, heads, 1, d)
    # Compiled, as in the compiled step (eager, the float32 form's conversions cost about what they save).
    fns = [torch.compile(f, dynamic=False) for f in (bf16_matmuls, decode_attention)]
    best = [float("inf"), float("inf")]
    for fn in fns:
        fn(q, k, v, mask)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(200):
                fn(q, k, v, mask)
            best[i] = min(best[i], (time.perf_counter() - t0) / 200 * 1e6)
    return best[0], best[1]


def guards(rounds: int) -> tuple[float, float]:
    model, cache = model_and_cache(torch.bfloat16)
    replayed = DecodeStep(model, cache, compile=True)
    guarded = DecodeStep(model, cache, compile=True)
    # the same step through torch.compile with Dynamo's guards kept (its own region, as the step's)
    guarded._forward = torch.compile(guarded._model_forward, dynamic=False, isolate_recompiles=True)
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for step in (guarded, replayed):  # compile both
            ms_per_step(step, cache)
        for _ in range(rounds):
            for i, step in enumerate((guarded, replayed)):
                best[i] = min(best[i], ms_per_step(step, cache))
    return best[0], best[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    first, second = threads(args.rounds)
    print(f"eager fp32 step: {first:.2f} ms on the thread that built and first ran the model, "
          f"{second:.2f} ms on a second thread ({second / first:.2f}x)", flush=True)
    bf16_us, f32_us = attention(args.rounds)
    print(f"decode attention, batch 1, bf16 keys/values: bf16 matmuls {bf16_us:.1f} us, float32 "
          f"{f32_us:.1f} us a call", flush=True)
    with_g, without_g = guards(args.rounds)
    print(f"compiled bf16 step: {with_g:.2f} ms with Dynamo's guards, {without_g:.2f} ms without "
          f"({with_g - without_g:.2f} ms a call)", flush=True)
    if args.no_write:
        return 0
    replace_section(HERE / "RESULTS.md", SECTION, [
        SECTION, "",
        f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"`python benchmarks/probe_step.py`: `small` preset, batch 1, {CONTEXT}-token context, each pair "
        f"alternating, best of {args.rounds} rounds; attention compiled, as in the compiled step.", "",
        "| what | A | B | |", "|---|---:|---:|---:|",
        f"| eager fp32 step: the thread that built the model (A) vs a second thread (B) | {first:.2f} ms | "
        f"{second:.2f} ms | {second / first:.2f}x |",
        f"| decode attention, bf16 keys/values: bf16 matmuls (A) vs float32 (B) | {bf16_us:.1f} us | "
        f"{f32_us:.1f} us | {bf16_us / f32_us:.2f}x |",
        f"| compiled bf16 step: with Dynamo's guards (A) vs without (B) | {with_g:.2f} ms | {without_g:.2f} ms | "
        f"{with_g - without_g:.2f} ms |", ""])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
