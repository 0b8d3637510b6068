"""Training steps with FSDP2 + expert parallelism vs replicated-dense expert parallelism, at 1, 2 and 4 ranks.

Two layouts of the same model and batch (each rank trains ``--rows`` sequences of ``--seq-len`` tokens;
MoGE routing with the exact-size dispatch; AdamW):

* ``replicated EP``: routed experts split by whole groups over the E ranks, every dense parameter
  (embeddings, attention, norms, router, shared experts, head) and its AdamW state on every rank,
  gradients averaged by DDP (torch's bucketed all-reduce) with the expert shards left out of it;
* ``FSDP2 + EP``: :func:`moge.parallel.shard_model` - the same expert split, and every parameter,
  gradient and AdamW moment additionally sharded by FSDP2 (dense over all ranks).

Per configuration it starts fresh processes (gloo on CPU, or ``--backend nccl``) and measures:

* step time: forward + backward + clip + AdamW between barriers (the slowest rank sets it), median over
  ``--steps`` after ``--warmup``; the configurations are run interleaved, ``--rounds`` times, best kept;
* model state per rank: bytes of this rank's parameters, gradients and AdamW moments, counted from
  the tensors it holds (exact); the largest rank is reported;
* peak memory per rank: on CUDA ``max_memory_allocated``; on CPU the growth of the process's peak RSS
  from before the model was built (includes allocator slack and transient buffers; noisy).

Usage: ``PYTHONPATH=src python benchmarks/bench_fsdp_ep.py --ranks 1 2 4 --out benchmarks/RESULTS_EP.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from moge.config import get_config
from moge.model import MoGEForCausalLM
from moge.parallel import MeshShape, apply_expert_parallel, build_mesh, clip_grad_norm_, local_numel, shard_model
from results_md import machine, replace_section

SECTION = "## Training steps: FSDP2 + EP vs replicated EP (`bench_fsdp_ep.py`)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layouts(world: int) -> list[tuple[str, int, int]]:
    """``(layout, dp_shard, ep)`` measured at ``world`` ranks."""
    out = [("replicated EP", 1, world), ("FSDP2 + EP", 1, world)]
    if world >= 4:
        out.append(("FSDP2 + EP", 2, world // 2))
    return out


def _build(layout: str, dp: int, ep: int, cfg, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model to step, module to call)`` in ``layout`` on this rank."""
    torch.manual_seed(0)
    model = MoGEForCausalLM(cfg).to(device)
    world = dp * ep
    if layout == "FSDP2 + EP":
        shard_model(model, build_mesh(MeshShape(dp, ep), device.type))
        return model, model
    if world == 1:
        return model, model
    apply_expert_parallel(model, dist.group.WORLD)
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    # DDP all-reduces the dense gradients; the expert shards are this rank's own.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    total = 0
    for p in model.parameters():
        total += 2 * local_numel(p) * p.element_size()  # the parameter and its gradient
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim():
                total += local_numel(v) * v.element_size()
    return total


def _worker(rank: int, world: int, port: int, layout: str, dp: int, ep: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    cuda = args.backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    cfg = get_config(args.preset, num_hidden_layers=args.layers, experts_backend=args.experts_backend,
                     router_aux_loss_coef=0.0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, fwd = _build(layout, dp, ep, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq_len),
                        generator=torch.Generator().manual_seed(rank)).to(device)
    times, state = [], 0
    for i in range(args.warmup + args.steps):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fwd(ids, labels=ids).loss.backward()
        if layout == "replicated EP" and world > 1:
            for n, p in model.named_parameters():
                if ".experts." in n:  # the expert shard holds every rank's gradient: the global mean
                    p.grad.div_(world)
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state = max(state, _state_bytes(model, opt))
        opt.zero_grad(set_to_none=True)
        sync()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    mine = {"step_s": statistics.median(times), "state": state, "peak": peak}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            "layout": layout, "ranks": world, "dp_shard": dp, "ep": ep,
            "step_ms": 1e3 * max(e["step_s"] for e in everyone),
            "state_mb": max(e["state"] for e in everyone) / 1e6, "peak_mb": max(e["peak"] for e in everyone) / 1e6}))
    dist.barrier()
    dist.destroy_process_group()


def run(args) -> list[dict]:
    """All configurations, interleaved, ``args.rounds`` times; the best step time of each is kept."""
    best: dict[tuple, dict] = {}
    for rnd in range(args.rounds):
        for world in args.ranks:
            for layout, dp, ep in _layouts(world):
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                    path = f.name
                mp.spawn(_worker, args=(world, _free_port(), layout, dp, ep, args, path), nprocs=world, join=True)
                r = json.loads(Path(path).read_text())
                os.unlink(path)
                key = (world, layout, dp, ep)
                if key not in best or r["step_ms"] < best[key]["step_ms"]:
                    best[key] = {**r, "peak_mb": max(r["peak_mb"], best.get(key, r)["peak_mb"])}
                print(f"round {rnd + 1}: {_fmt(r)}", flush=True)
    return [best[k] for k in sorted(best)]


HEADER = ("| ranks | layout | dp_shard x ep | step ms (median, best round) | model state per rank MB "
          "(params + grads + AdamW) | peak memory growth per rank MB |\n|---|---|---|---|---|---|")


def _fmt(r: dict) -> str:
    return (f"| {r['ranks']} | {r['layout']} | {r['dp_shard']} x {r['ep']} | {r['step_ms']:.0f} | "
            f"{r['state_mb']:.0f} | {r['peak_mb']:.0f} |")


def plot(rows: list[dict], path: Path) -> None:
    """Step time and model state per rank against ranks, one line per layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (layout, dp), style in ((("replicated EP", 1), "o-"), (("FSDP2 + EP", 1), "s-"), (("FSDP2 + EP", 2), "^--")):
        sel = [r for r in rows if r["layout"] == layout and r["dp_shard"] == dp]
        if not sel:
            continue
        label = f"{layout} (dp_shard {dp})" if layout != "replicated EP" else layout
        axes[0].plot([r["ranks"] for r in sel], [r["step_ms"] for r in sel], style, label=label)
        axes[1].plot([r["ranks"] for r in sel], [r["state_mb"] for r in sel], style, label=label)
    axes[0].set(xlabel="ranks", ylabel="step ms (slowest rank)", title="step time (shared CPU: noisy)")
    axes[1].set(xlabel="ranks", ylabel="MB per rank", title="params + grads + AdamW per rank")
    for ax in axes:
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the preset's width, fewer layers)")
    p.add_argument("--rows", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--experts-backend", default="auto")
    p.add_argument("--out", default=None, help="write the section into this Markdown file (and a plot beside it)")
    args = p.parse_args()
    device = torch.device("cuda", 0) if args.backend == "nccl" else None
    cfg = get_config(args.preset, num_hidden_layers=args.layers)
    head = (f"{machine(device)}, backend {args.backend}, {args.threads} thread(s) per rank; {args.preset} preset with "
            f"{args.layers} layers (H={cfg.hidden_size}, V={cfg.vocab_size}, N={cfg.num_experts}, M={cfg.groups}), "
            f"{args.rows} x {args.seq_len} tokens per rank, {args.steps} steps after {args.warmup}, "
            f"best of {args.rounds} interleaved rounds")
    print(head)
    t0 = time.time()
    rows = run(args)
    print(HEADER)
    for r in rows:
        print(_fmt(r))
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        out = Path(args.out)
        png = out.parent / "results_fsdp_ep.png"
        plot(rows, png)
        replace_section(out, SECTION, [SECTION, "", head + ".", "", "```", "PYTHONPATH=src python benchmarks/"
                        f"bench_fsdp_ep.py --ranks {' '.join(map(str, args.ranks))} --out {args.out}", "```", "",
                        HEADER, *map(_fmt, rows), "", f"![step time and memory per rank]({png.name})", ""])


if __name__ == "__main__":
    main()
