"""The main job: train MoGE and top-K twins on the built-in corpus and write a report with plots.

Both models use the ``tiny`` preset with identical total and activated parameters, the same tokenizer,
data order, initialisation seed and schedule; only the router differs. The report
(``OUT/report.md``, PNGs, ``OUT/overview.png``) shows loss curves, the Imbalance Score and max/mean
device load of every layer over training, the last batch's per-group load, per-domain expert token
shares and generated samples. MoGE's Imbalance Score is checked to be exactly 0 at every logged step
in every layer. The run ends with the MoGE model quantized to W8A8 (``moge quantize``'s defaults, measured
on every validation row; ``--no-w8a8`` skips it). The defaults took 4 min 07 s on two idle CPU cores
(8.5 min on a busy machine) before the W8A8 step was added; see README.md for its cost.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from .. import validate as V
from ..analysis.report import read_metrics, summary_table, write_report
from ..checkpoint import load_pretrained
from ..checkpoint.io import writable_dir
from ..config import ROUTERS, get_config
from ..data.corpus import load_documents, split_documents
from ..data.tokenizer import BOS_ID, EOS_ID, decode, save_tokenizer, train_tokenizer
from ..errors import MoGEError
from ..generate import generate
from ..train import TrainConfig, Trainer, resolve_device
from .quantize import w8a8_quality


PROMPTS = ["def ", "The ", "12 + 7 * 3 ="]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``moge demo`` options."""
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--routers", default="moge,topk", help="comma-separated routers to compare (default moge,topk)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per model (default 400)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps (default 30)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validations (default 100)")
    p.add_argument("--log-every", type=int, default=5, help="steps between metrics lines (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each in its own single-threaded process (default: as many "
                        "as there are CPU cores and routers on CPU, 1 on CUDA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--no-w8a8", dest="w8a8", action="store_false",
                   help="skip the W8A8 row (MoGE model quantized with expert-aware smoothing, static activations)")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_one(cfg, position: int) -> None:
    """Train one run in a worker process (its progress bar on line ``position``)."""
    Trainer(replace(cfg), bar_position=position).train()


def generate_samples(run_dir: Path, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                     seed: int = 0) -> list[tuple[str, str]]:
    """Sampled continuations (temperature 0.8, top-k 40, fixed seed) of ``prompts`` from a checkpoint."""
    model = load_pretrained(run_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    out = []
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)  # one-token decode steps are tiny ops: extra threads only wait
    try:
        for prompt in prompts:
            ids = [BOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
            res = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=0.8, top_k=40,
                           eos_token_id=EOS_ID, generator=g)
            out.append((prompt, decode(tokenizer, res[0, len(ids):].tolist())))
    finally:
        torch.set_num_threads(threads)
    return out


def _check(args: argparse.Namespace, out: Path) -> list[str]:
    """The routers to train; every run's options are checked before the tokenizer is trained (minutes
    for a large vocabulary)."""
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    if not routers:
        raise MoGEError("--routers is empty")
    bad = [r for r in routers if r not in ROUTERS]
    if bad:
        raise MoGEError(f"--routers: unknown router(s) {bad}; choose from {list(ROUTERS)}")
    V.integer("--jobs", args.jobs, 1, optional=True, error=MoGEError)
    get_config(args.preset)
    resolve_device(args.device)
    replace(_run_config(args, out, routers[0]), tokenizer=None, vocab_size=args.vocab_size).validate()
    writable_dir(out, "--out")
    return routers


def _run_config(args: argparse.Namespace, out: Path, router: str) -> TrainConfig:
    return TrainConfig(out=str(out / router), preset=args.preset, router=router, steps=args.steps,
                       batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                       eval_every=args.eval_every, log_every=args.log_every, save_every=0, seed=args.seed,
                       device=args.device, progress=args.progress, tokenizer=str(out / "tokenizer.json"))


def _train_all(args: argparse.Namespace, configs: list[TrainConfig], tokenizer) -> None:
    """Train every run: in turn on CUDA (or with ``--jobs 1``), else one single-threaded process each."""
    jobs = args.jobs or (1 if resolve_device(args.device).type == "cuda" else
                         max(1, min(len(configs), os.cpu_count() or 1)))
    if jobs == 1:
        for cfg in configs:
            Trainer(cfg, tokenizer=tokenizer).train()
        return
    # One single-threaded process per run: on a small shared CPU this beats multi-threaded kernels,
    # whose thread barriers stall badly whenever another process takes a core.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        for f in [pool.submit(_train_one, cfg, i) for i, cfg in enumerate(configs)]:
            f.result()


def _balance_note(run_dir: Path) -> str:
    """The report's line on MoGE's Imbalance Score; raises if it was ever non-zero (it cannot be)."""
    m = read_metrics(run_dir, "moge")
    checked = [l["imbalance_score_max"] for r in m.train for l in r["layers"] if not l.get("dense")]
    zero = bool(checked) and all(v == 0.0 for v in checked)
    if not zero:
        raise MoGEError("MoGE produced a non-zero Imbalance Score; this contradicts its construction")
    return (f"MoGE Imbalance Score exactly 0 in every layer at every training step: yes ({len(m.train)} "
            f"logging intervals x {len(m.moe_layers())} layers, each the maximum over its steps).")


def _print_summary(summaries, w8a8: str | None, notes: list[str], timings: dict[str, float], report_path: Path,
                   out: Path) -> None:
    print()
    print(summary_table(summaries))
    print()
    if w8a8 is not None:
        print(w8a8)
        print()
    for note in notes:
        if w8a8 is None or w8a8 not in note:
            print(note)
    print("wall-clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    cpu = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"CPU time (this process and its workers): {cpu:.0f} s on {os.cpu_count()} cores")
    print(f"report: {report_path}")
    print(f"overview: {out / 'overview.png'}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``moge demo``."""
    t_start = time.perf_counter()
    out = Path(args.out).expanduser()
    routers = _check(args, out)
    timings: dict[str, float] = {}

    # One tokenizer for every run, trained on the training split only.
    t0 = time.perf_counter()
    vocab = args.vocab_size or get_config(args.preset).vocab_size
    train_docs, _ = split_documents(load_documents(None))
    tokenizer = train_tokenizer((d.text for d in train_docs), vocab)
    save_tokenizer(tokenizer, out / "tokenizer.json")
    timings["corpus + tokenizer"] = time.perf_counter() - t0
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens trained in {timings['corpus + tokenizer']:.1f} s")

    run_dirs = {r: out / r for r in routers}
    for run_dir in run_dirs.values():
        if run_dir.exists():  # the demo owns its output directory: start each run fresh
            shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    _train_all(args, [_run_config(args, out, r) for r in routers], tokenizer)
    timings["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = {r: generate_samples(d, tokenizer, PROMPTS, seed=args.seed) for r, d in run_dirs.items()}
    timings["samples"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    notes, w8a8 = [], None
    if "moge" in run_dirs:
        notes.append(_balance_note(run_dirs["moge"]))
    if "moge" in run_dirs and args.w8a8:
        t1 = time.perf_counter()
        calib = 8 * args.batch_size * args.seq_len  # eight training batches: 16,384 tokens by default
        quality, _, _ = w8a8_quality(run_dirs["moge"], tokenizer, args.seq_len, calib_tokens=calib)
        timings["W8A8"] = time.perf_counter() - t1
        w8a8 = quality.summary("moge")
        notes.append(f"W8A8 of the MoGE model (`moge quantize`: expert-aware smoothing, static activations, "
                     f"{calib:,} calibration tokens of the training split), every validation row; see "
                     f"docs/quantization.md:\n\n" + w8a8)
    timings["total before report"] = time.perf_counter() - t_start
    report_path, summaries = write_report(out, run_dirs, samples, timings, notes)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    _print_summary(summaries, w8a8, notes, timings, report_path, out)
    return 0
