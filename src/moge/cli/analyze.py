"""Expert analyses of a checkpoint (the paper's Figures 7-10): token share, co-activation, balance.

``moge analyze CKPT [--data PATH ...] [--compare CKPT2] --out DIR`` routes text of each data domain
(the built-in corpus's validation split by default) through the model and writes ``DIR/analysis.json``
plus PNGs: per-layer, per-domain expert token share (uniform K/N marked), co-activation of expert
pairs, each expert's share of its group over the layers, the busiest expert's and busiest device's
share (against ``--compare``, e.g. the top-K twin) and a specialisation index per layer.

The analyses themselves (which models they work on, the shape legend) are :mod:`moge.analysis.analyze`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..analysis.analyze import AnalysisError, collect_routing, domain_rows, moe_layers, summarize
from ..analysis.plots import write_figures
from ..checkpoint import load_pretrained, write_json
from ..data.tokenizer import load_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``moge analyze`` options."""
    p.add_argument("checkpoint", help="checkpoint directory (released layout)")
    p.add_argument("--compare", default=None, metavar="CKPT2", help="a second checkpoint (e.g. the top-K twin)")
    p.add_argument("--out", required=True, help="output directory for analysis.json and the PNGs")
    p.add_argument("--data", nargs="+", default=None, help="text files/directories/JSONL/Parquet, one domain "
                   "per path (default: the built-in code/prose/math corpus)")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="which documents to route: the validation split (default) or all of them")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per domain at most (default 16384)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices for the busiest-device share (default: the model's group count)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _load(path: str, device: str):
    return load_pretrained(path, dtype=torch.float32, device=device)


def _tokenizer(path: str | None, ckpt: str):
    return load_tokenizer(Path(path or ckpt).expanduser())


def run(args: argparse.Namespace) -> int:
    """Entry point of ``moge analyze``."""

    for flag, v in (("--threads", args.threads), ("--devices", args.devices)):
        if v is not None and v < 1:
            raise AnalysisError(f"{flag} must be >= 1, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise AnalysisError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot create --out {out}: {e.strerror or e}") from None
    results = {}
    for label, ckpt in [("main", args.checkpoint)] + ([("compare", args.compare)] if args.compare else []):
        model = _load(ckpt, args.device)
        tok = _tokenizer(args.tokenizer, ckpt)
        seq_len = min(args.seq_len, moe_layers(model)[0].max_position_embeddings)
        rows = domain_rows(args.data, tok, seq_len, args.tokens, args.split)
        rec = collect_routing(model, rows, args.batch_size, args.devices, args.progress)
        results[label] = {"checkpoint": str(ckpt), **summarize(rec)}
        del model
    figures = write_figures(out, results)
    doc = {"analyses": results, "figures": figures}
    write_json(out / "analysis.json", doc)
    for label, r in results.items():
        c = r["checks"]
        spec = [l["specialisation_index"] for l in r["layers"]]
        dev = [l["busiest_device_share"] for l in r["layers"]]
        print(f"{label} ({r['router']}, {r['checkpoint']}): {sum(r['tokens'].values()):,} tokens over "
              f"{len(r['domains'])} domains; busiest device share {min(dev):.4f}-{max(dev):.4f} (uniform "
              f"{r['uniform_device_share']:.4f}); specialisation index {min(spec):.3f}-{max(spec):.3f}; "
              f"max |sum of shares - K| {c['max_abs_share_sum_minus_k']:.2e}; max within-group co-activation "
              f"{c['max_coactivation_within_group']:.4f}")
    print(f"wrote {out / 'analysis.json'} and {len(figures)} figures in {out}")
    return 0
