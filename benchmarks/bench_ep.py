"""Expert-parallel MoE layer step time and per-rank expert compute: MoGE (fixed splits) vs top-K (count exchange).

Spawns E local processes per configuration (gloo on CPU, or ``--backend nccl`` with one GPU per rank)
and, for each router/dispatcher variant, measures on one EP-sharded layer:

* step time: forward + backward of the layer on every rank's local tokens, between barriers (the
  slowest rank sets it), median over ``--steps``;
* per-rank expert compute: the expert MLPs' forward + backward on exactly the rows that rank received,
  replayed *one rank at a time* (the others wait at a barrier), minimum over ``--steps`` repeats. On
  CPU it is the process CPU time (one thread per rank), so other processes sharing the cores do not
  inflate it; on GPU it is synchronised wall time. max/mean over ranks is the imbalance factor;
* token-expert pairs per rank (max/mean).

Usage: ``PYTHONPATH=src python benchmarks/bench_ep.py --ranks 2 4 8 --out benchmarks/RESULTS_EP.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moge.experts import get_experts_backend
from moge.model.moe import MoGELayer
from moge.parallel import apply_expert_parallel

VARIANTS = [("moge", "fixed"), ("moge", "variable"), ("topk", "variable")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens(args, rank: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=g)
    if args.correlated:
        # Real hidden states share a mean direction; it concentrates top-K routing on a few experts.
        common = torch.randn(args.hidden, generator=torch.Generator().manual_seed(7))
        x = x + args.correlated * common
    return x.to(device)


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    cuda = args.backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # On CPU, a rank's own work is its process CPU time: immune to other processes sharing the cores.
    clock = time.perf_counter if cuda else time.process_time
    rows = []
    for router, dispatch in VARIANTS:
        torch.manual_seed(0)
        layer = MoGELayer(args.hidden, args.experts, args.topk, args.ffn, 0, num_groups=args.groups,
                          router=router, experts_backend=args.experts_backend).to(device)
        ep = apply_expert_parallel(layer, dist.group.WORLD, dispatch=dispatch)
        x = _tokens(args, rank, device).requires_grad_(True)
        # Capture what the experts receive, for the isolated per-rank compute replay below.
        captured = {}
        real = get_experts_backend(ep.experts.backend, device)

        def capturing(x_RH, ids_RC, w_RC, gu, down):
            captured.update(x=x_RH.detach(), ids=ids_RC.detach(), w=w_RC.detach())
            return real(x_RH, ids_RC, w_RC, gu, down)

        step_s = []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            y, _ = ep(x)
            y.square().mean().backward()
            sync()
            dist.barrier()
            if i >= args.warmup:
                step_s.append(time.perf_counter() - t0)
            ep.zero_grad(set_to_none=True)
        # one more forward through the capturing backend to get this rank's received rows
        fn = ep.experts.forward
        ep.experts.forward = lambda x_RH, ids_RC, w_RC, backend=None: capturing(
            x_RH, ids_RC, w_RC, ep.experts.gate_up_proj, ep.experts.down_proj)
        with torch.no_grad():
            ep(x.detach())
        ep.experts.forward = fn
        pairs = captured["ids"].numel()  # token-expert pairs this rank computes
        compute_s = 0.0
        for turn in range(world):
            dist.barrier()
            if turn == rank:
                xs = captured["x"].clone().requires_grad_(True)
                times = []
                for _ in range(args.steps):
                    sync()
                    t0 = clock()
                    out = real(xs, captured["ids"], captured["w"], ep.experts.gate_up_proj, ep.experts.down_proj)
                    out.square().mean().backward()
                    sync()
                    times.append(clock() - t0)
                compute_s = min(times)  # min: robust to other processes on a shared machine
        dist.barrier()
        mine = dict(router=router, dispatch=ep.dispatcher.name, step_s=statistics.median(step_s), step_min_s=min(step_s),
                    compute_s=compute_s,
                    pairs=pairs)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            comp = [e["compute_s"] for e in everyone]
            prs = [e["pairs"] for e in everyone]
            rows.append(dict(ranks=world, router=router, dispatch=dispatch,
                             step_ms=1e3 * max(e["step_s"] for e in everyone),
                             step_min_ms=1e3 * max(e["step_min_s"] for e in everyone),
                             compute_max_ms=1e3 * max(comp), compute_mean_ms=1e3 * statistics.mean(comp),
                             pairs_max=max(prs), pairs_mean=statistics.mean(prs)))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run(args) -> list[dict]:
    rows = []
    for world in args.ranks:
        if args.backend == "nccl" and torch.cuda.device_count() < world:
            print(f"skip {world} ranks: nccl needs {world} GPUs, found {torch.cuda.device_count()}")
            continue
        if args.groups % world:
            print(f"skip {world} ranks: {args.groups} groups are not divisible by {world}")
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        t0 = time.time()
        mp.spawn(_worker, args=(world, _free_port(), args, path), nprocs=world, join=True)
        with open(path) as f:
            got = json.load(f)
        os.unlink(path)
        for r in got:
            print(_fmt(r), flush=True)
        print(f"  ({world} ranks done in {time.time() - t0:.0f} s)", flush=True)
        rows += got
    return rows


HEADER = ("| ranks | router | dispatch | count exchange | step ms fwd+bwd (median / min) | "
          "expert compute ms per rank (max / mean) | compute max/mean | pairs per rank (max / mean) | "
          "pairs max/mean |\n|---|---|---|---|---|---|---|---|---|")


def _fmt(r: dict) -> str:
    return (f"| {r['ranks']} | {r['router']} | {r['dispatch']} | {'yes' if r['dispatch'] == 'variable' else 'no'} "
            f"| {r['step_ms']:.0f} / {r['step_min_ms']:.0f} | {r['compute_max_ms']:.1f} / {r['compute_mean_ms']:.1f} "
            f"| {r['compute_max_ms'] / r['compute_mean_ms']:.2f} | {r['pairs_max']} / {r['pairs_mean']:.0f} "
            f"| {r['pairs_max'] / r['pairs_mean']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--correlated", type=float, default=0.0,
                   help="add this multiple of a shared direction to every token (skews top-K routing)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--experts-backend", default="grouped_mm",
                   help="experts compute backend on every rank (grouped_mm: no host sync; see moge.experts)")
    p.add_argument("--out", default=None, help="append the table (markdown) to this file")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"backend {args.backend}; H={args.hidden} N={args.experts} M={args.groups} K={args.topk} "
          f"F={args.ffn} T_local={args.tokens} correlated={args.correlated} experts={args.experts_backend}")
    print(HEADER)
    rows = run(args)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### {args.backend}, H={args.hidden} N={args.experts} M={args.groups} K={args.topk} "
                    f"F={args.ffn} T_local={args.tokens}, experts backend {args.experts_backend}, "
                    f"{args.threads} thread(s)/rank, "
                    f"tokens {'correlated x' + str(args.correlated) if args.correlated else 'iid'}\n\n")
            f.write(HEADER + "\n" + "\n".join(_fmt(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
