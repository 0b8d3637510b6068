"""Measure this machine into the ``local-cpu`` hardware profile, and compare the simulator with the real
model's measured prefill and decode times.

Calibration measures three things with torch on the CPU: fp32 matmul GFLOP/s at several GEMM sizes (kept
as a curve, since small GEMMs run far below the large-GEMM rate), memory bandwidth (a large tensor copy),
and the fixed cost of one eager PyTorch op (tiny element-wise ops, where the time is all dispatch). The
per-op cost becomes the profile's ``op_overhead_us``: at the sizes of the ``debug`` / ``tiny`` presets
Python and dispatch overhead dominate, and it is modelled explicitly, never tuned per data point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import get_config
from ..engine.step import DecodeStep, attended_slots, prefill
from ..experts import get_experts_backend
from ..model import MoGEForCausalLM
from ..model.cache import StaticKVCache
from .hardware import PROFILES, HardwareError, HardwareProfile, default_calibration_path
from .perf import simulate


# (M, K, N) GEMMs: from decode-sized to large; the rate is interpolated by FLOPs between them
MATMUL_SIZES = [(1, 64, 64), (4, 64, 128), (4, 128, 512), (16, 256, 256), (64, 128, 384), (256, 128, 384), (256, 512, 512),
                (512, 1024, 1024), (1024, 1024, 1024)]

ATTN_SIZES = [(1, 4, 1, 64, 32), (4, 4, 1, 128, 32), (1, 4, 64, 64, 16), (1, 4, 256, 256, 32),
              (1, 8, 512, 512, 64)]

EXPERT_SIZES = [(2, 96, 64, 8, 2), (8, 128, 64, 16, 4), (64, 96, 64, 8, 2), (256, 96, 48, 16, 4),
                (512, 256, 128, 16, 4)]


def _best_time(fn, repeats: int, min_time: float = 0.02) -> float:
    """Fastest seconds per call of ``fn`` over ``repeats`` batches of calls lasting >= ``min_time`` each.

    The minimum, not the median: on a shared machine other processes only ever add time, so the
    fastest repeat is the best estimate of what this machine does undisturbed. Calibration and the
    model timings use the same statistic."""
    fn()  # warm-up
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 16:
            break
        n *= 2
    samples = [dt / n]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return min(samples)


def measure(repeats: int = 5) -> dict:
    """Measure matmul rates, memory bandwidth and per-op overhead; returns a profile dict."""
    import torch

    curve = []
    for m, k, n in MATMUL_SIZES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        sec = _best_time(lambda: torch.mm(a, b), repeats)
        curve.append((2.0 * m * k * n, 2.0 * m * k * n / sec / 1e9))
    # attention: causal prefill-like and single-query decode-like SDPA calls (B, heads, S, L, head_dim)
    attn_curve = []
    for b, nh, sq, sk, hd in ATTN_SIZES:
        q, kk = torch.randn(b, nh, sq, hd), torch.randn(b, nh, sk, hd)
        causal = sq == sk and sq > 1
        sec = _best_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, kk, is_causal=causal), repeats)
        keys = (sk + 1) / 2 if causal else sk
        attn_curve.append((4.0 * b * nh * sq * keys * hd, 4.0 * b * nh * sq * keys * hd / sec / 1e9))
    # routed experts through the backend the model uses on a CPU (sort, per-expert matmuls, scatter-add):
    # (tokens T, hidden H, width F, experts N, K) -> achieved GFLOP/s of the expert matmuls
    backend = get_experts_backend("auto", torch.device("cpu"))
    experts_curve = []
    for t, h, f, n, k in EXPERT_SIZES:
        x = torch.randn(t, h)
        ids = torch.rand(t, n).argsort(-1)[:, :k]
        w = torch.rand(t, k)
        gate_up, down = torch.randn(n, 2 * f, h), torch.randn(n, h, f)
        sec = _best_time(lambda: backend(x, ids, w, gate_up, down), repeats)
        experts_curve.append((6.0 * t * k * h * f, 6.0 * t * k * h * f / sec / 1e9))
    big = torch.empty(32 * 1024 * 1024)  # 128 MB, far beyond the caches
    big.uniform_()
    dst = torch.empty_like(big)
    sec = _best_time(lambda: dst.copy_(big), max(3, repeats), min_time=0.1)
    mem_bw = 2 * big.numel() * 4 / sec / 1e9  # read + write
    # per-op overhead: a tiny block written like eager model code (modules, views, element-wise math,
    # a softmax/argmax/gather routing step) on 8-wide tensors, so the time is all Python and dispatch;
    # divided by the aten ops it dispatches (counted, not assumed)
    block = _OverheadBlock()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        ops = _count_ops(lambda: block(x)) or 1
        sec = _best_time(lambda: block(x), repeats)
    overhead_us = sec / ops * 1e6
    base = PROFILES["local-cpu"]
    peak = max(r for _, r in curve)
    return dict(base.to_dict(), description=f"this machine's CPU ({torch.get_num_threads()} torch threads), calibrated",
                bf16_tflops=peak / 1e3, fp32_tflops=peak / 1e3, mem_bw_gbs=mem_bw, op_overhead_us=overhead_us,
                matmul_curve=[list(p) for p in curve], attn_curve=[list(p) for p in attn_curve],
                experts_curve=[list(p) for p in experts_curve],
                source=f"measured by `moge simulate calibrate` at {time.strftime('%Y-%m-%d %H:%M:%S')}")


def _OverheadBlock():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_w = nn.Parameter(torch.ones(8))
            self.proj = nn.Linear(8, 8)
            self.gate = nn.Linear(8, 4, bias=False)
            self.up = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_w
            q = self.proj(h).view(2, 4, 2, 4).transpose(1, 2)
            a, b = q.chunk(2, dim=-1)
            q = torch.cat([-b, a], dim=-1) * 0.5 + q
            h = h + q.transpose(1, 2).reshape(2, 4, 8)
            s = self.gate(h).softmax(-1)
            idx = s.argmax(-1, keepdim=True)
            w = s.gather(-1, idx)
            return h + torch.nn.functional.silu(self.up(h)) * w

    return Block().eval()


# ---- comparison with the real model ----------------------------------------------------------------
def _count_ops(fn) -> int | None:
    """Number of aten ops one call of ``fn`` dispatches (None if the dispatch hook is unavailable)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:
        return None

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def compare(hw: HardwareProfile, presets: list[str], prefill_tokens: int, decode_batch: int,
            decode_context: int, repeats: int) -> list[dict]:
    """Time prefill (plain forward) and the engine's decode step (what ``moge.generate`` runs) of the
    real ``moge.model.decoder``, and the simulator's predictions."""
    import torch


    rows = []
    torch.manual_seed(0)
    for name in presets:
        cfg = get_config(name)
        model = MoGEForCausalLM(cfg).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            ids = torch.randint(0, cfg.vocab_size, (1, prefill_tokens), generator=g)

            def prefill():
                return model(ids, use_cache=True, logits_to_keep=1)

            pre_s = _best_time(prefill, repeats, min_time=0.05)
            pre_ops = _count_ops(prefill)
            ctx_ids = torch.randint(0, cfg.vocab_size, (decode_batch, decode_context), generator=g)
            nxt = torch.randint(0, cfg.vocab_size, (decode_batch, 1), generator=g)
        dec_s, dec_ops, n_steps = _engine_decode(model, ctx_ids, nxt, repeats)
        mean_ctx = decode_context + n_steps // 2
        for phase, batch, ctx, meas, ops in (("prefill", 1, prefill_tokens, pre_s, pre_ops),
                                             ("decode", decode_batch, mean_ctx, dec_s, dec_ops)):
            res = simulate(cfg, hw, 1, phase, batch, ctx, "fp32", check_memory=False)
            sim_ops = sum(o.count * o.eager_launches for o in res.ops)
            overhead = sum(o.count * o.overhead_ms for o in res.ops)
            rows.append({"preset": name, "phase": phase, "batch": batch, "context": ctx,
                         "measured_ms": meas * 1e3, "predicted_ms": res.step_ms, "error": res.step_ms / (meas * 1e3) - 1,
                         "predicted_overhead_ms": overhead, "measured_aten_ops": ops, "simulated_eager_ops": sim_ops})
    return rows


def _engine_decode(model, ctx_ids, nxt, repeats: int) -> tuple[float, int | None, int]:
    """The decode step ``moge.generate`` runs (:mod:`moge.engine`: static cache, fixed-shape step, under
    ``torch.inference_mode()``, attended slots rounded up to 64 as its CPU loop does) after a prompt
    of ``ctx_ids``: (fastest step in seconds, aten ops of one step, timed steps). The cache grows by
    one token per step; the prediction uses the mean context of the timed steps."""
    import torch


    b, ctx = ctx_ids.shape
    n_steps = max(16, 4 * repeats)
    capacity = ctx + n_steps + 2
    with torch.inference_mode():
        cache = StaticKVCache.for_model(model, b, capacity)
        prefill(model, cache, ctx_ids, kv_len=ctx)
        step = DecodeStep(model, cache)
        stored = [ctx]  # rows' length, kept on the host as the engine's loop does

        def one():
            stored[0] += 1
            return step(nxt, kv_len=attended_slots(stored[0], capacity))

        one()  # warm-up (and the few-rows kernel choice of moge.experts.linear)
        dec_ops = _count_ops(one)
        cache.rollback(2)
        stored[0] = ctx
        steps = []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            one()
            steps.append(time.perf_counter() - t0)
    return min(steps), dec_ops, n_steps


def fit_decode_overhead(hw: HardwareProfile, rows: list[dict], preset: str) -> float:
    """The per-op cost on the decode path (us) at which the simulator matches the measured decode step
    of ``preset`` (one of ``rows``); the prediction is linear in it, so two evaluations solve it."""
    import dataclasses


    row = next((r for r in rows if r["preset"] == preset and r["phase"] == "decode"), None)
    if row is None:
        raise HardwareError(f"--fit-decode {preset}: no decode measurement of that preset (add it to --presets)")
    cfg = get_config(preset)

    def predicted(us: float) -> float:
        prof = dataclasses.replace(hw, decode_op_overhead_us=us)
        return simulate(cfg, prof, 1, "decode", row["batch"], row["context"], "fp32", check_memory=False).step_ms

    a, b = predicted(0.0), predicted(1.0) - predicted(0.0)
    return max(0.0, (row["measured_ms"] - a) / b) if b > 0 else hw.op_overhead_us


def run_calibrate(args: argparse.Namespace) -> int:
    """CLI entry of ``moge simulate calibrate``."""
    import torch

    # one thread by default: on a loaded 2-core machine OpenMP spin-waits make multi-threaded tiny ops
    # erratic; calibration and comparison always run with the same thread count
    torch.set_num_threads(args.threads)
    print("measuring matmul rates, memory bandwidth and per-op overhead ...", file=sys.stderr)
    prof = measure(args.repeats)
    out = Path(args.out) if args.out else default_calibration_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    hw = HardwareProfile.from_dict(prof)
    result = {"profile_path": str(out), "profile": prof}
    if args.fit_decode and not args.compare:
        raise HardwareError("--fit-decode needs --compare (it fits to the measured decode step)")
    if args.compare:
        print("timing the real model ...", file=sys.stderr)
        result["compare"] = compare(hw, args.presets, args.prefill_tokens, args.decode_batch,
                                    args.decode_context, args.repeats)
        if args.fit_decode:
            # fitted on one preset's decode step; the other presets' decode rows are held out
            prof["decode_op_overhead_us"] = fit_decode_overhead(hw, result["compare"], args.fit_decode)
            prof["source"] += f"; decode_op_overhead_us fitted to the {args.fit_decode} decode step"
            hw = HardwareProfile.from_dict(prof)
            result["compare"] = _repredict(hw, result["compare"], args.fit_decode)
    out.write_text(json.dumps(prof, indent=1))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"wrote {out}")
    print(f"  matmul fp32: " + ", ".join(f"{f / 1e6:.1f} MFLOP -> {r:.1f} GFLOP/s" for f, r in prof["matmul_curve"]))
    print(f"  memory bandwidth (copy): {prof['mem_bw_gbs']:.2f} GB/s;  per-op overhead: {prof['op_overhead_us']:.2f} us")
    if prof.get("decode_op_overhead_us") is not None:
        print(f"  decode-path per-op cost (fitted to the {args.fit_decode} decode step): "
              f"{prof['decode_op_overhead_us']:.2f} us")
    if args.compare:
        print(format_compare(result["compare"]))
    return 0


def _repredict(hw: HardwareProfile, rows: list[dict], fitted: str) -> list[dict]:
    """The comparison rows predicted again with ``hw``, each marked fit / held-out."""

    out = []
    for r in rows:
        res = simulate(get_config(r["preset"]), hw, 1, r["phase"], r["batch"], r["context"], "fp32", check_memory=False)
        role = ("fit" if r["preset"] == fitted else "held-out") if r["phase"] == "decode" else "not fitted"
        out.append(dict(r, predicted_ms=res.step_ms, error=res.step_ms / r["measured_ms"] - 1, role=role,
                        predicted_overhead_ms=sum(o.count * o.overhead_ms for o in res.ops)))
    return out


def format_compare(rows: list[dict]) -> str:
    """Markdown table of :func:`compare` rows."""
    out = ["| preset | phase | batch x context | measured ms | predicted ms | error | predicted overhead ms | aten ops measured / simulated | role |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['preset']} | {r['phase']} | {r['batch']} x {r['context']} | {r['measured_ms']:.2f} | "
                   f"{r['predicted_ms']:.2f} | {r['error']:+.1%} | {r['predicted_overhead_ms']:.2f} | "
                   f"{r['measured_aten_ops']} / {r['simulated_eager_ops']:.0f} | {r.get('role', 'not fitted')} |")
    return "\n".join(out)
