"""Benchmark weight-only int8 / int4 against fp32 on CPU: torch's weight-only kernels per matrix, and eager
decode of the ``small`` model.

1. **Kernels** (``--part kernels``): the decode step's matrix shapes of the ``small`` preset (a routed
   expert's gate/up ``[512, 768]`` and down ``[768, 256]``, the shared expert's gate ``[1024, 768]``, the
   output head ``[32000, 768]``) at 1, 8 and 32 rows, GB/s of weight read: ``F.linear`` in fp32 and bf16,
   ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu`` (group 128) with bf16 and fp32
   activations, and the dequantize oracle (dequantize the whole weight, then ``F.linear``). Weights are cold:
   each call reads the next of enough copies to exceed the caches (~100 MB per variant). Variants
   interleaved within each round; best of ``--rounds``.
2. **Decode** (``--part decode``): ``small`` preset, random weights (seed 0), fp32 / int8 / int4 (group
   128), the output head float or quantized; decode after a 64-token prompt, teacher-forced steps at batch
   1 and 8, the weight-only models in their default computation (``auto``: the kernels, bf16
   activations). Interleaved rounds, best of ``--rounds``; weights read per step counted from the routing.

Writes the tables into the ``## Weight-only int8 / int4 (bench_weight_only.py)`` section of RESULTS.md.

Usage: ``PYTHONPATH=src python benchmarks/bench_weight_only.py [--threads 2] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_quant import decode, step_weight_bytes  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)
from results_md import copy_bandwidth, machine, replace_section  # noqa: E402
from moge.config import get_config  # noqa: E402
from moge.model import MoGEForCausalLM  # noqa: E402
from moge.quant import quantize_weights  # noqa: E402
from moge.quant.weight_only import dequantize_weight, quantize_weight_only, unpack_int4  # noqa: E402

SECTION = "## Weight-only int8 / int4 (bench_weight_only.py)"
SHAPES = {"expert gate/up": (512, 768), "expert down": (768, 256), "shared gate": (1024, 768), "head": (32000, 768)}
GROUP = 128
POOL_BYTES = 100e6


def _pool(make, nbytes: float) -> list:
    return [make() for _ in range(max(2, int(POOL_BYTES // nbytes)))]


def kernel_variants(o: int, i: int) -> dict[str, tuple[list, object, float]]:
    """name -> (pool of cold weight operands, fn(x, operand), weight bytes per call)."""
    def int8():
        q, s = quantize_weight_only(torch.randn(o, i), 8)
        return q, s.squeeze(-1)

    def int4():
        q, s = quantize_weight_only(torch.randn(o, i), 4, GROUP)
        packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32) + 8, 1)
        st = s.t().contiguous()
        return packed, torch.stack([st, torch.zeros_like(st)], -1).contiguous(), q, s

    fp = _pool(lambda: torch.randn(o, i), o * i * 4)
    bf = [w.bfloat16() for w in fp[: max(2, len(fp) // 2 + 1)]]
    i8 = _pool(int8, o * i)
    i4 = _pool(int4, o * i / 2)
    i8b = [(q, s.bfloat16()) for q, s in i8]
    i4b = [(p, sz.bfloat16()) for p, sz, _, _ in i4]
    return {
        "fp32 F.linear": (fp, lambda x, w: F.linear(x, w), o * i * 4),
        "bf16 F.linear": (bf, lambda x, w: F.linear(x.bfloat16(), w), o * i * 2),
        "int8, bf16 act": (i8b, lambda x, p: torch._weight_int8pack_mm(x.bfloat16(), *p), o * i),
        "int8, fp32 act": (i8[:4], lambda x, p: torch._weight_int8pack_mm(x, *p), o * i),
        "int8 dequant": (i8[:4], lambda x, p: F.linear(x, dequantize_weight(p[0], p[1].unsqueeze(-1))), o * i),
        "int4, bf16 act": (i4b, lambda x, p: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], GROUP, p[1]),
                           o * i / 2),
        "int4, fp32 act": (i4[:4], lambda x, p: torch._weight_int4pack_mm_for_cpu(x, p[0], GROUP, p[1]), o * i / 2),
        "int4 dequant": (i4[:4], lambda x, p: F.linear(x, dequantize_weight(p[2], p[3])), o * i / 2),
    }


def bench_kernels(rounds: int) -> list[str]:
    lines = ["| matrix [O, I] | rows | " + " | ".join(kernel_variants(16, 256)) + " |",
             "|---|---:|" + "---:|" * 8]
    for label, (o, i) in SHAPES.items():
        variants = kernel_variants(o, i)
        for rows in (1, 8, 32):
            x = torch.randn(rows, i)
            best = {}
            for _ in range(rounds):
                for name, (pool, fn, nbytes) in variants.items():
                    fn(x, pool[0])
                    t0 = time.perf_counter()
                    for op in pool:
                        fn(x, op)
                    dt = (time.perf_counter() - t0) / len(pool)
                    best[name] = max(best.get(name, 0.0), nbytes / dt / 1e9)
            lines.append(f"| {label} [{o}, {i}] | {rows} | " + " | ".join(f"{best[n]:.1f}" for n in variants) + " |")
            print(lines[-1], flush=True)
    return lines


def bench_decode(preset: str, rounds: int, steps: int) -> tuple[list[str], float]:
    torch.manual_seed(0)
    fp = MoGEForCausalLM(get_config(preset)).eval()
    variants = {"fp32": fp}
    for bits in (8, 4):
        for head in (False, True):
            q = copy.deepcopy(fp)
            quantize_weights(q, bits, GROUP if bits == 4 else None, head=head)
            variants[f"int{bits}" + (f" g{GROUP}" if bits == 4 else "") + (", head too" if head else "")] = q
    for m in variants.values():  # untimed: allocator growth, kernel operands, kernel choices
        decode(m, 1, 3)
        decode(m, 8, 2)
    best, distinct = {}, {}
    for r in range(rounds):
        for b in (1, 8):
            for name, m in variants.items():
                dt, dist = decode(m, b, steps)
                best[(b, name)] = max(best.get((b, name), 0.0), b * steps / dt)
                distinct[(b, name)] = dist
                print(f"round {r + 1} batch {b} {name:20s} {b * steps / dt:8.1f} tokens/s", flush=True)
    bw = max(copy_bandwidth() for _ in range(2))
    lines = ["| batch | variant | tokens/s | vs fp32 | weights read per step | weights-read bound | of the bound |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for b in (1, 8):
        for name, m in variants.items():
            wb = step_weight_bytes(m, distinct[(b, name)], b)
            rate, bound = best[(b, name)], b * bw / wb
            lines.append(f"| {b} | {name} | {rate:,.1f} | {rate / best[(b, 'fp32')]:.2f}x | {wb / 1e6:,.0f} MB | "
                         f"{bound:,.0f} | {100 * rate / bound:.0f}% |")
    return lines, bw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("kernels", "decode", "both"), default="both")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--note", default="", help="a sentence on the machine's state (e.g. shared, its load)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    body = [f"Machine: {machine()}. {args.note}".rstrip(), ""]
    if args.part in ("kernels", "both"):
        body += ["Kernels: GB/s of weight read per call (cold weights, best of "
                 f"{args.rounds} interleaved rounds; int4 group {GROUP}; act = activation dtype):", "",
                 *bench_kernels(args.rounds), ""]
    if args.part in ("decode", "both"):
        lines, bw = bench_decode(args.preset, args.rounds, args.steps)
        body += [f"Eager decode, `{args.preset}` preset, random weights, {args.steps} teacher-forced steps after a "
                 f"64-token prompt, best of {args.rounds} interleaved rounds; weight-only models in their default "
                 f"computation (torch's kernels, bf16 activations). Copy bandwidth in this run: {bw / 1e9:.1f} GB/s "
                 f"(read + write).", "", *lines, ""]
    body += [f"Command: `PYTHONPATH=src python benchmarks/bench_weight_only.py --part {args.part} --threads "
             f"{args.threads} --rounds {args.rounds}`.", ""]
    print("\n".join(body))
    if not args.no_write:
        replace_section(Path(args.results), SECTION, [SECTION, "", *body])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
