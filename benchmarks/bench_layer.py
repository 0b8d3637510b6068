"""Benchmark the MoGE MoE layer: tokens/s of every experts backend vs transformers and a dense roofline.

Shapes (issue 2): H=1024, N=64 experts in M=8 groups, K'=1 (K=8), F=256, shared F=256, at prefill
(T=2048) and decode (T=8). For each backend and router (moge, topk) it times the forward (no grad) and
forward+backward of ``MoGELayer``. In the same run it times

* a dense roofline: ``x @ W`` with the same matmul FLOPs per token as the layer (routed + shared +
  router), forward and forward+backward (dx and dW, like the layer);
* Hugging Face transformers' ``Qwen2MoeSparseMoeBlock`` at identical shapes (``norm_topk_prob=False``)
  under every experts implementation that runs here (``eager``, ``grouped_mm``, ``batched_mm``),
  keeping the fastest.

Each measurement is warmup + several repeats, median time. With ``--rounds R`` the whole sweep runs R
times interleaved and each entry keeps its best median, which filters out noise from other jobs on a
shared machine. Prints a ratio table and writes it (with the machine description) into the
``## MoE layer (bench_layer.py)`` section of ``benchmarks/RESULTS.md`` plus a PNG bar chart.

Usage: ``PYTHONPATH=src python benchmarks/bench_layer.py [--quick] [--dtype float32] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from moge.experts import available_backends, default_backend  # noqa: E402
from moge.model.moe import MoGELayer  # noqa: E402
from results_md import machine, replace_section  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

H, N, M, K, F_EXP, F_SHARED = 1024, 64, 8, 8, 256, 256
SHAPES = {"prefill": 2048, "decode": 8}
SECTION = "## MoE layer (bench_layer.py)"
MODES = ("fwd", "fwd+bwd")
# --paper: the paper's layer (Pangu Pro MoE: H=5120, 64 experts in 8 groups, K'=1, F=1344, shared
# 5376), forward only, at the token counts of issue 10 (a GPU benchmark: bf16 on CUDA).
PAPER = dict(H=5120, N=64, M=8, K=8, F_EXP=1344, F_SHARED=5376,
             SHAPES={"decode": 8, "mid": 456, "prefill": 4096}, SECTION="## MoE layer, paper shape (bench_layer.py --paper)",
             MODES=("fwd",))
SLOW_S = 5.0  # seconds per call above which a contender is timed on a single warm call, in round 1 only


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, warmup: int, repeats: int, slow_s: float = SLOW_S) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls.

    A contender whose first call takes over ``slow_s`` seconds (transformers' eager experts loop at
    prefill) is timed on one more call only, so a slow baseline cannot blow the time budget.
    """
    t0 = time.perf_counter()
    fn()
    sync(device)
    if time.perf_counter() - t0 > slow_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_per_token() -> int:
    """Matmul FLOPs of one token's forward: K routed SwiGLU experts + shared SwiGLU + router."""
    return 2 * H * (K * 3 * F_EXP + 3 * F_SHARED + N)


def init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic normal init of every parameter (transformers leaves stacked experts uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def make_fwd_bwd(model_fn, x: torch.Tensor, params: list[torch.Tensor]):
    """A closure running forward (no grad) and one running forward+backward with a dense random grad."""
    xg = x.detach().clone().requires_grad_()
    grad = {}  # a dense random output gradient, made once the output shape is known

    def fwd():
        with torch.no_grad():
            model_fn(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        xg.grad = None
        y = model_fn(xg)
        if "gy" not in grad:
            grad["gy"] = torch.randn_like(y)
        y.backward(grad["gy"])

    return fwd, fwd_bwd


def hf_block(impl: str, dtype: torch.dtype, device: torch.device, weights_from: torch.nn.Module):
    """transformers' Qwen2MoeSparseMoeBlock at our shapes using experts implementation ``impl``.

    It gets the weights of ``weights_from`` (our top-K layer: same names, shapes and gate/up layout), so
    both route every token to the same experts; at decode the time depends on how many distinct
    experts' weights a batch reads, so different random routers would not be a fair comparison.
    """
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=H, num_experts=N, num_experts_per_tok=K, moe_intermediate_size=F_EXP,
                         shared_expert_intermediate_size=F_SHARED, norm_topk_prob=False)
    cfg._experts_implementation = impl
    block = Qwen2MoeSparseMoeBlock(cfg)
    init_(block, 1)  # shared_expert_gate, which our layer does not have
    missing, unexpected = block.load_state_dict(weights_from.state_dict(), strict=False)
    assert missing == ["shared_expert_gate.weight"] and unexpected == ["router_scale"], (missing, unexpected)
    block = block.to(device=device, dtype=dtype)

    def run(x_TH):
        out = block(x_TH.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)
    return run, list(block.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds (about 2 minutes on CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved sweeps, best median kept")
    ap.add_argument("--backends", nargs="*", default=None, help="experts backends (default: all registered)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for this run (default: torch's choice); 1 is far less "
                         "sensitive to other jobs on a shared machine")
    ap.add_argument("--eager-prefill", action="store_true",
                    help="also time our eager (oracle) backend at prefill (slow: ~30 s per backward)")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / the PNG")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)} (or of --paper's)")
    ap.add_argument("--paper", action="store_true", help="the paper's layer shape at T=8/456/4096, forward "
                    "only, own RESULTS.md section and PNG (meant for CUDA bf16)")
    args = ap.parse_args(argv)
    if args.paper:
        globals().update(PAPER)
    args.shapes = args.shapes or list(SHAPES)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    warmup, repeats = (1, 3) if args.quick else (2, 5)
    rounds = args.rounds or (1 if args.quick else 2)
    backends = args.backends or available_backends()
    fast = default_backend(device)
    torch.manual_seed(0)

    # ---- build every contender once ---------------------------------------------------------------
    entries: dict[tuple[str, str], tuple] = {}  # (shape, name) -> (fwd, fwd_bwd)
    for shape, t in SHAPES.items():
        if shape not in args.shapes:
            continue
        x = torch.randn(t, H, device=device, dtype=dtype)
        ours_topk = None
        for router in ("moge", "topk"):
            layer = MoGELayer(H, N, K, F_EXP, F_SHARED, num_groups=M, router=router)
            init_(layer, 0)
            layer = layer.to(device=device, dtype=dtype)
            if router == "topk":
                ours_topk = layer
            for be in backends:
                if be == "eager" and shape == "prefill" and not args.eager_prefill:
                    continue  # the per-expert test oracle: its backward takes ~30 s a call here
                fn = (lambda layer_, be_: lambda x_: layer_(x_, backend=be_)[0])(layer, be)
                entries[(shape, f"ours/{router}/{be}")] = make_fwd_bwd(fn, x, list(layer.parameters()))
        w = torch.randn(H, flops_per_token() // (2 * H), device=device, dtype=dtype, requires_grad=True)
        entries[(shape, "dense")] = make_fwd_bwd(lambda x_, w_=w: x_ @ w_, x, [w])
        for impl in ("eager", "grouped_mm", "batched_mm"):
            gathered = t * K * 3 * F_EXP * H * torch.finfo(dtype).bits // 8  # batched_mm copies a weight per pair
            if impl == "batched_mm" and gathered > 4 * 2**30:
                print(f"[{shape}] transformers batched_mm: skipped, it would gather {gathered / 2**30:.0f} GiB "
                      f"of per-pair expert weights (does not fit)")
                continue
            try:
                run, params = hf_block(impl, dtype, device, ours_topk)
                make_fwd_bwd(run, x[:4], params)[1]()  # probe: some have no kernel for this device/dtype
                fwd, fb = make_fwd_bwd(run, x, params)
            except Exception as e:  # noqa: BLE001 - report and skip implementations that cannot run here
                print(f"[{shape}] transformers {impl}: cannot run here ({type(e).__name__}: {str(e)[:80]})")
                continue
            entries[(shape, f"hf/{impl}")] = (fwd, fb)

    # ---- measure ----------------------------------------------------------------------------------
    best: dict[tuple[str, str, str], float] = {}  # (shape, name, mode) -> best tokens/s
    total = rounds * len(entries) * 2
    done, t_start = 0, time.perf_counter()
    for rnd in range(rounds):
        for (shape, name), (fwd, fb) in entries.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                if mode not in MODES:
                    continue
                if rnd and SHAPES[shape] / best[(shape, name, mode)] > SLOW_S:
                    done += 1  # a slow baseline (over SLOW_S a call): one round is enough
                    continue
                reps = repeats if shape == "decode" else max(2, repeats - 2)
                tps = SHAPES[shape] / median_time(fn, device, warmup, reps * (4 if shape == "decode" else 1))
                key = (shape, name, mode)
                best[key] = max(best.get(key, 0.0), tps)
                done += 1
                el = time.perf_counter() - t_start
                print(f"[{done}/{total} round {rnd + 1}] {shape:7s} {name:28s} {mode:8s} {tps:10.0f} tok/s"
                      f"  (elapsed {el:.0f}s, ETA {el / done * (total - done):.0f}s)", flush=True)

    # ---- report -----------------------------------------------------------------------------------
    lines = table(best, backends, fast)
    print("\n".join(lines))
    if not args.no_write:
        png = Path(args.results).with_name("results_layer_paper.png" if args.paper else "results_layer.png")
        plot(best, png)
        write_section(Path(args.results), lines, args, dtype, rounds, warmup, repeats, png.name)
        print(f"wrote {args.results} and {png}")
    return 0


def table(best, backends, fast) -> list[str]:
    """Markdown rows: tokens/s of every contender, with ratios to transformers' best and the roofline."""
    out = ["| shape | mode | contender | tokens/s | vs transformers best | vs dense roofline |",
           "|---|---|---|---:|---:|---:|"]
    for shape in SHAPES:
        for mode in MODES:
            hf = {n: v for (s, n, md), v in best.items() if s == shape and md == mode and n.startswith("hf/")}
            hf_name, hf_best = max(hf.items(), key=lambda kv: kv[1]) if hf else ("-", float("nan"))
            dense = best.get((shape, "dense", mode), float("nan"))
            names = sorted(n for (s, n, md) in best if s == shape and md == mode)
            for name in names:
                v = best[(shape, name, mode)]
                tag = " (auto)" if name.endswith("/" + fast) else ""
                tag += " (best)" if name == hf_name else ""
                out.append(f"| {shape} T={SHAPES[shape]} | {mode} | {name}{tag} | {v:,.0f} | "
                           f"{v / hf_best:.2f}x | {v / dense:.2f}x |")
    return out


def plot(best, path: Path) -> None:
    """Bar chart of tokens/s per contender, one panel per shape x mode (log scale if the range is wide)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {s for (s, _, _) in best}
    panels = [(s, md) for s in SHAPES if s in measured for md in MODES]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 5), squeeze=False)
    axes = axes[0]
    for ax, (shape, mode) in zip(axes, panels):
        items = sorted(((n, v) for (s, n, md), v in best.items() if s == shape and md == mode), key=lambda kv: kv[0])
        colors = ["tab:blue" if n.startswith("ours") else "tab:orange" if n.startswith("hf") else "tab:gray"
                  for n, _ in items]
        ax.barh([n for n, _ in items], [v for _, v in items], color=colors)
        values = [v for _, v in items]
        log = max(values) > 30 * min(values)  # linear unless a slow baseline would flatten the rest
        if log:
            ax.set_xscale("log")
        ax.set_title(f"{shape} (T={SHAPES[shape]}) {mode}")
        ax.set_xlabel("tokens/s" + (" (log)" if log else ""))
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"MoE layer H={H} N={N} M={M} K={K} F={F_EXP} shared={F_SHARED}: ours (blue), transformers "
                 f"(orange), dense (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(path: Path, lines: list[str], args, dtype, rounds, warmup, repeats, png_name) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    body = [SECTION, "",
            f"Machine: {machine()}. dtype {str(dtype).replace('torch.', '')}, device {args.device}. "
            f"Shapes H={H}, N={N}, M={M}, K'=1 (K={K}), F={F_EXP}, shared F={F_SHARED}; "
            + ", ".join(f"{k} T={v}" for k, v in SHAPES.items()) + ".",
            f"Method: {warmup} warmup calls then the median of several timed calls; {rounds} interleaved "
            f"round(s), best median kept. Dense roofline = `x @ W` with the layer's matmul FLOPs "
            f"({flops_per_token():,} per token forward). transformers = `Qwen2MoeSparseMoeBlock` "
            f"(norm_topk_prob=False; note it also has a sigmoid gate on the shared expert), fastest "
            f"experts implementation per row marked (best). `(auto)` marks the backend `auto` picks here.",
            f"Command: `PYTHONPATH=src python benchmarks/bench_layer.py{' --paper' if args.paper else ''}"
            f"{' --quick' if args.quick else ''} "
            f"--dtype {args.dtype} --device {args.device}{f' --threads {args.threads}' if args.threads else ''}`. "
            f"Our `eager` backend (the per-expert test oracle) is left out at prefill unless `--eager-prefill`; "
            f"contenders over {SLOW_S:.0f} s a call are timed on one warm call, in round 1 only.",
            "", *lines, "", f"![layer benchmark]({png_name})", ""]
    replace_section(path, SECTION, body)


if __name__ == "__main__":
    raise SystemExit(main())
