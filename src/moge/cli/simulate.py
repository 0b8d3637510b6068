"""Simulate MoE load imbalance (Monte Carlo) and inference performance; calibrate and search configs.

Sub-commands:
  imbalance  Monte Carlo of the Imbalance Score under top-K vs MoGE routing (paper Figure 2(b))
  perf       operator-level step time / throughput / memory of a model on a hardware profile
  paper      the simulator vs the paper's numbers: calibration points and held-out points apart
             (``validate`` is the same command)
  fit        re-run the fit of the 800I A2's unknown figures on the calibration points
  calibrate  measure this machine into the local-cpu profile; --compare against the real model
  search     sweep model shapes for the best decode throughput per card under a latency limit
  train-memory  per-rank training memory of a preset on a (dp_shard, ep) mesh: the plan that
             ``moge train --dry-run`` prints, without a training configuration
"""

from __future__ import annotations

import argparse
import json
import sys

from ..parallel.plan import format_plan, memory_plan
from ..progress import progress
from ..sim.calibrate import run_calibrate
from ..sim.fit import FIT_PARAMETERS, calibration_points, fit, format_table, rounded
from ..sim.hardware import A2_FITTED, HardwareError, get_profile
from ..sim.imbalance import (ImbalanceInputError, check_shape, exact_imbalance, imbalance_study, load_frequencies,
                             plot_study)
from ..sim.paper import PAPER_MTP, paper_comparison, plot_comparison
from ..sim.perf import MTP, PerfError, check_layout, default_layout, format_result, resolve_model, simulate
from ..sim.search import run_search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imbalance``, ``perf``, ``paper``/``validate``, ``fit``, ``calibrate`` and ``search`` sub-subcommands."""
    sub = parser.add_subparsers(dest="sim_command", metavar="SIMCOMMAND")

    p = sub.add_parser("imbalance", help="Monte Carlo of device imbalance under top-K vs MoGE routing")
    p.add_argument("--experts", type=int, default=None, help="routed experts N (default 64, or the frequency file's length)")
    p.add_argument("--k", type=int, default=8, help="experts per token K")
    p.add_argument("--devices", type=int, default=8, help="devices D = MoGE groups")
    p.add_argument("--tokens", type=int, nargs="+", default=[16], help="tokens per batch |X| (one or several)")
    p.add_argument("--trials", type=int, default=100_000, help="random batches per token count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-metrics", metavar="FILE", help="draw from measured per-expert frequencies "
                   "(metrics.jsonl with expert_counts, or a JSON list)")
    p.add_argument("--layer", type=int, default=None, help="with --from-metrics: use only this layer's counts")
    p.add_argument("--exact", action="store_true", help="also compute exact values by enumeration (small cases)")
    p.add_argument("--plot", metavar="FILE.png", help="write a Figure 2(b)-style plot")
    p.add_argument("--hist-tokens", type=int, default=None, help="token count of the histogram (default 16 if run, else the first)")
    p.add_argument("--json", action="store_true", help="print one JSON object {router: {tokens: stats}}")
    p.set_defaults(_sim=_run_imbalance)

    p = sub.add_parser("perf", help="predict step time, throughput and memory of one inference step")
    _perf_args(p)
    p.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    p.add_argument("--batch", type=int, default=1, help="sequences in the step")
    p.add_argument("--context", type=int, default=2048, help="prompt length (prefill) / cached tokens (decode)")
    p.add_argument("--router", choices=("moge", "topk"), default=None, help="default: the config's router")
    p.add_argument("--attn-tp", type=int, default=None, help="attention TP over chips (DP = chips / TP)")
    p.add_argument("--expert-ep", type=int, default=None, help="routed-expert EP over chips (expert TP = chips / EP)")
    p.add_argument("--shared-tp", type=int, default=None, help="shared-expert / dense-MLP TP (default: all chips)")
    p.add_argument("--mtp-depth", type=int, default=0, help="decode with multi-token prediction: drafted tokens per step")
    p.add_argument("--mtp-acceptance", type=float, default=0.85,
                   help="per-token acceptance rate of the drafts (default 0.85, an assumption: see docs/simulator.md)")
    p.add_argument("--no-memory-check", action="store_true", help="report memory but do not refuse a misfit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(_sim=_run_perf)

    for name in ("paper", "validate"):
        p = sub.add_parser(name, help="simulator vs the paper's numbers: calibration and held-out points apart")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override an 800I A2 profile field (what-if; the held-out errors then mean nothing)")
        p.add_argument("--mtp-acceptance", type=float, default=None, help="MTP acceptance for the MTP points")
        p.add_argument("--plot", metavar="FILE.png", help="write the errors as a bar chart")
        p.add_argument("--json", action="store_true")
        p.set_defaults(_sim=_run_paper)

    p = sub.add_parser("fit", help="re-run the 800I A2 fit on the calibration points and compare with the stored values")
    p.add_argument("--json", action="store_true")
    p.set_defaults(_sim=_run_fit)

    p = sub.add_parser("calibrate", help="measure this CPU into the local-cpu profile (and compare with the real model)")
    p.add_argument("--out", default=None, help="profile JSON to write (default ~/.cache/moge/local-cpu.json)")
    p.add_argument("--compare", action="store_true", help="also time the real moge.model.decoder and compare with predictions")
    p.add_argument("--presets", nargs="+", default=["debug", "tiny"], help="presets for --compare")
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=4)
    p.add_argument("--decode-context", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions (the fastest is used)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for calibration and comparison")
    p.add_argument("--fit-decode", metavar="PRESET", default=None,
                   help="with --compare: fit the decode-path per-op cost to PRESET's measured decode step "
                        "(the other presets stay held out) and store it in the profile")
    p.add_argument("--json", action="store_true")
    p.set_defaults(_sim=_run_calibrate)

    p = sub.add_parser("search", help="sweep model shapes: best decode throughput/card under a latency limit")
    p.add_argument("--hardware", default="ascend-800i-a2")
    p.add_argument("--calibration", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cards", type=int, default=4)
    p.add_argument("--weights", choices=("bf16", "int8", "fp32"), default="int8")
    p.add_argument("--kv-cache", choices=("bf16", "int8"), default=None, help="default: int8 with int8 weights, else bf16")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--latency-ms", type=float, default=None, help="per-token step limit (default 50 on the 800I A2, 100 on the 300I Duo)")
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 5120, 6144, 7168, 8192])
    p.add_argument("--layers", type=int, nargs="+", default=[40, 44, 48, 52, 56, 60, 64])
    p.add_argument("--q-heads", type=int, nargs="+", default=[32, 40, 48, 56, 64])
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 16])
    p.add_argument("--experts", type=int, nargs="+", default=[32, 48, 64])
    p.add_argument("--groups", type=int, nargs="+", default=[8])
    p.add_argument("--expert-ffn", type=int, nargs="+", default=[1024, 1344, 1536, 1792, 2048],
                   help="expert intermediate sizes (the shared expert is 4x, as in Pangu Pro MoE)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=153376)
    p.add_argument("--params-min", type=float, default=60.0, help="billions")
    p.add_argument("--params-max", type=float, default=80.0, help="billions")
    p.add_argument("--router", choices=("moge", "topk"), default="moge")
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(_sim=_run_search)

    p = sub.add_parser("train-memory", help="per-rank training memory on a (dp_shard, ep) mesh (as moge train --dry-run)")
    p.add_argument("--model", default="pangu-pro-moe-72b", help="preset name or config.json path")
    p.add_argument("--dp-shard", type=int, default=8)
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="global rows per step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--mixed-precision", choices=("none", "bf16"), default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.set_defaults(_sim=_run_train_memory)


def _perf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="pangu-pro-moe-72b", help="preset name or config.json path")
    p.add_argument("--hardware", default="ascend-800i-a2", help="hardware profile name or profile .json")
    p.add_argument("--calibration", default=None, help="calibrated local-cpu profile (default ~/.cache/moge/local-cpu.json)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a profile field")
    p.add_argument("--cards", type=int, default=4)
    p.add_argument("--weights", choices=("bf16", "int8", "fp32"), default="bf16")
    p.add_argument("--kv-cache", choices=("bf16", "int8", "fp32"), default=None,
                   help="default: int8 with int8 (W8A8) weights, fp32 with fp32, else bf16")


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise HardwareError(f"--set needs FIELD=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen sub-subcommand."""
    fn = getattr(args, "_sim", None)
    if fn is None:
        print(__doc__, file=sys.stderr)
        return 1
    return int(fn(args) or 0)


def _progress(total: int, desc: str):
    return progress(total, desc, "trial", unit_scale=True, mininterval=0.5, leave=False)


def _run_imbalance(args: argparse.Namespace) -> int:
    freqs = None
    n = args.experts
    if args.from_metrics:
        freqs = load_frequencies(args.from_metrics, args.layer)
        if n is None:
            n = len(freqs)
        elif n != len(freqs):
            raise ImbalanceInputError(f"{args.from_metrics} has {len(freqs)} experts but --experts is {n}")
    n = 64 if n is None else n
    check_shape(n, args.k, args.devices)
    if args.trials < 1 or min(args.tokens) < 1:
        raise ImbalanceInputError("--trials and --tokens must be >= 1")
    hist_t = args.hist_tokens or (16 if 16 in args.tokens else args.tokens[0])
    tokens = list(dict.fromkeys(args.tokens + ([hist_t] if args.plot and hist_t not in args.tokens else [])))
    bar = _progress(2 * args.trials * len(tokens), "imbalance")
    try:
        study = imbalance_study(n, args.k, args.devices, tokens, args.trials, args.seed, freqs,
                                keep_samples=bool(args.plot), progress=bar.update)
    finally:
        bar.close()
    if args.exact:
        for router in study:
            for t in tokens:
                try:
                    study[router][str(t)]["exact"] = exact_imbalance(n, args.k, args.devices, t, router, freqs)
                except ImbalanceInputError as e:
                    study[router][str(t)]["exact"] = {"error": str(e)}
    if args.plot:
        src = f", frequencies from {args.from_metrics}" if freqs is not None else ""
        plot_study(study, args.plot, hist_t, f"N={n} experts, K={args.k}, D={args.devices} devices, "
                                               f"{args.trials:,} batches per point{src}")
    for router in study:
        for t in study[router]:
            study[router][t].pop("is", None)
    if args.json:
        print(json.dumps(study))
        return 0
    print(f"N={n} K={args.k} D={args.devices} trials={args.trials:,} seed={args.seed}"
          + (f" frequencies={args.from_metrics}" if freqs is not None else " uniform routing"))
    print(f"{'router':<7}{'tokens':>7}{'P(IS>0)':>10}{'mean IS':>10}{'p99 IS':>9}{'max IS':>9}"
          f"{'E[max/mean]':>13}{'p99 max/mean':>14}")
    for router in study:
        for t, s in study[router].items():
            print(f"{router:<7}{t:>7}{s['p_imbalanced']:>10.4f}{s['mean_is']:>10.4f}{s['p99_is']:>9.3f}"
                  f"{s['max_is']:>9.3f}{s['mean_max_over_mean_load']:>13.4f}{s['p99_max_over_mean_load']:>14.3f}")
            if "exact" in s and "error" not in s["exact"]:
                e = s["exact"]
                print(f"{'':<7}{'exact':>7}{e['p_imbalanced']:>10.4f}{e['mean_is']:>10.4f}{'':>18}"
                      f"{e['mean_max_over_mean_load']:>13.4f}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _run_perf(args: argparse.Namespace) -> int:
    config = resolve_model(args.model)
    hw = get_profile(args.hardware, args.calibration, **_overrides(args.set))
    if args.cards < 1:
        raise PerfError(f"--cards must be >= 1, got {args.cards}")
    ranks = args.cards * hw.chips_per_card
    layout = default_layout(config, ranks, args.attn_tp, args.expert_ep, args.shared_tp)
    check_layout(config, layout, ranks)
    mtp = MTP(args.mtp_depth, args.mtp_acceptance) if args.mtp_depth else None
    res = simulate(config, hw, args.cards, args.phase, args.batch, args.context, args.weights, args.router,
                   layout, args.kv_cache, check_memory=not args.no_memory_check, mtp=mtp)
    if args.json:
        d = res.to_dict()
        d.update(model=args.model, hardware=hw.name, weights=args.weights)
        print(json.dumps(d))
    else:
        print(format_result(res, f"{args.model} on {args.cards} x {hw.description}, weights {args.weights}"))
    return 0


def _run_paper(args: argparse.Namespace) -> int:
    profiles = {"ascend-800i-a2": get_profile("ascend-800i-a2", **_overrides(args.set))}
    mtp = PAPER_MTP if args.mtp_acceptance is None else MTP(PAPER_MTP.depth, args.mtp_acceptance)
    rows = paper_comparison(profiles, mtp)
    if args.plot:
        plot_comparison(rows, args.plot)
    print(json.dumps(rows) if args.json else format_table(rows, profiles))
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    values = fit()
    stored = {k: A2_FITTED[k] for k in FIT_PARAMETERS}
    if args.json:
        print(json.dumps({"fitted": values, "rounded": rounded(values), "stored": stored,
                          "points": [p.label for p in calibration_points()]}))
        return 0
    print("fitted on: " + "; ".join(p.label for p in calibration_points()))
    for k, (_, _, _, what) in FIT_PARAMETERS.items():
        print(f"  {k:<14} {values[k]:10.4g}  (stored {stored[k]:g}) -- {what}")
    same = rounded(values) == stored
    print("the stored constants (hardware.A2_FITTED) match this fit" if same else
          "the stored constants differ: update hardware.A2_FITTED to the rounded values above")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    return run_calibrate(args)


def _run_search(args: argparse.Namespace) -> int:
    return run_search(args)


def _run_train_memory(args: argparse.Namespace) -> int:
    cfg = resolve_model(args.model)
    for flag, v in (("--dp-shard", args.dp_shard), ("--ep", args.ep), ("--batch-size", args.batch_size),
                    ("--seq-len", args.seq_len)):
        if v < 1:
            raise PerfError(f"{flag} must be >= 1, got {v}")
    if cfg.groups % args.ep:
        raise PerfError(f"--ep {args.ep} must divide the model's {cfg.groups} expert groups")
    world = args.dp_shard * args.ep
    if args.batch_size % world:
        raise PerfError(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")
    plan = memory_plan(cfg, args.dp_shard, args.ep, args.batch_size, args.seq_len, args.mixed_precision,
                       args.activation_checkpointing)
    print(format_plan(plan, f"{args.model} on {world} rank(s) (dp_shard {args.dp_shard} x ep {args.ep}), global "
                            f"batch {args.batch_size} x {args.seq_len} tokens, mixed precision "
                            f"{args.mixed_precision}, activation checkpointing "
                            f"{'on' if args.activation_checkpointing else 'off'}"))
    return 0
