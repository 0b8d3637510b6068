"""Quantize a checkpoint: W8A8 (expert-aware smoothing, eq. 10; the Ascend W8A8 layout) or weight-only int8 /
int4 (float activations; compressed-tensors' pack-quantized layout).

``moge quantize CKPT --out DIR`` (``--weights w8a8``, the default) calibrates on text (default: the built-in
corpus's training split), smooths (``--smoothing``: ``expert-aware`` = eq. 10, ``per-expert`` = the naive
baseline, ``none``), and quantizes every attention / expert / shared-expert linear to int8 per output channel
with static per-tensor (``--act static``, as Ascend stores them) or per-token dynamic activation scales.
``--weights int8`` (per output channel) and ``--weights int4`` (``--group-size`` inputs per scale) quantize
the same linears' weights only, without calibration, and with ``--head`` the output head too. The router,
embeddings and norms stay in float. ``--eval`` measures the result against full precision on the
validation split: per-domain loss, routing agreement and routing KL per MoE layer.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from ..checkpoint import CheckpointError, load_pretrained, write_json
from ..checkpoint.layout import quantization_format
from ..checkpoint.quantized import save_quantized
from ..checkpoint.weight_only import save_weight_only
from ..data.corpus import Document, load_documents, pack_documents, shuffled, split_documents
from ..data.tokenizer import BOS_ID, EOS_ID, encode_batch, load_tokenizer
from ..errors import MoGEError
from ..quant import ACTS, INT4_GROUPS, SMOOTHINGS, QuantError, calibration_rows, quantize, quantize_weights
from ..quant.quality import compare


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float checkpoint directory (released layout, with tokenizer.json)")
    p.add_argument("--out", help="output directory (W8A8: the Ascend layout; int8/int4: compressed-tensors "
                                 "pack-quantized); optional with --eval")
    p.add_argument("--weights", choices=WEIGHTS, default="w8a8",
                   help="w8a8 (int8 weights and activations, calibrated; default), int8 or int4 (weight-only, "
                        "float activations, no calibration)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4: inputs per scale, one of {', '.join(map(str, INT4_GROUPS))} (default 128, or the "
                        f"largest of 64 / 32 dividing every input dim)")
    p.add_argument("--head", action="store_true", help="int8/int4: quantize the output head too (default: float)")
    p.add_argument("--calib-data", nargs="*", default=None,
                   help="calibration text files / directories / JSONL / Parquet (default: the built-in corpus's "
                        "training split)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 16384)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration row (default 256)")
    p.add_argument("--alpha", type=float, default=None, help="migration strength in [0, 1] (default 0.5)")
    p.add_argument("--smoothing", choices=SMOOTHINGS, default=None,
                   help="expert-aware (eq. 10, default), per-expert (naive baseline; cannot be written in the "
                        "Ascend layout, use with --eval), none")
    p.add_argument("--act", choices=ACTS, default=None,
                   help="activation scales: static per tensor (Ascend, default) or dynamic per token")
    p.add_argument("--min-expert-tokens", type=int, default=None,
                   help="oversample experts below this many calibration tokens (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per calibration / evaluation batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="order of the calibration documents (default 0)")
    p.add_argument("--eval", action="store_true", help="compare with full precision on the validation split")
    p.add_argument("--eval-rows", type=int, default=64, help="validation rows per domain for --eval (default 64)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")


class QuantizeCommandError(MoGEError, ValueError):
    """Bad ``moge quantize`` arguments; the message names the argument."""


WEIGHTS = ("w8a8", "int8", "int4")
# The W8A8-only options and their defaults (None in the parser, so that one given with a weight-only kind is named).
W8A8_DEFAULTS = {"calib_tokens": 16384, "alpha": 0.5, "smoothing": "expert-aware", "act": "static",
                 "min_expert_tokens": 64}


def resolve_kind_options(args: argparse.Namespace) -> None:
    """Fill the W8A8 defaults, or refuse W8A8-only options with a weight-only kind (and int4-only ones
    elsewhere): :class:`QuantizeCommandError` naming the option."""
    if args.weights == "w8a8":
        for name, value in W8A8_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        given = [o for o, v in (("--group-size", args.group_size), ("--head", args.head or None)) if v is not None]
    else:
        given = [f"--{n.replace('_', '-')}" for n in W8A8_DEFAULTS if getattr(args, n) is not None]
        given += ["--group-size"] if args.weights == "int8" and args.group_size is not None else []
    if given:
        raise QuantizeCommandError(f"{', '.join(given)} does not apply to --weights {args.weights}"
                                   + (" (weight-only: no calibration or smoothing)" if args.weights != "w8a8" else ""))


def texts_for(data: list[str] | None, seed: int, split: str, budget_chars: int | None = None):
    """``{domain: [texts]}`` of the calibration (``split="train"``) or validation source, documents in a
    seeded order; with ``budget_chars`` only about that many characters are kept (encoding is the cost)."""

    train, val = split_documents(load_documents(data))
    docs = shuffled(train if split == "train" else val, seed)
    out: dict[str, list[str]] = {}
    total = 0
    for d in docs:
        if budget_chars is not None and total >= budget_chars:
            break
        out.setdefault(d.domain, []).append(d.text)
        total += len(d.text)
    return out


def calib_rows_for(tokenizer, data: list[str] | None, tokens: int, seq_len: int, seed: int = 0):
    """Calibration rows ``[R, seq_len]`` of ``tokens`` tokens from ``data``'s training split (None: the
    built-in corpus)."""

    texts = texts_for(data, seed, "train", budget_chars=16 * tokens)  # ~4 chars a token: 4x margin
    return calibration_rows([t for ts in texts.values() for t in ts], lambda b: encode_batch(tokenizer, b), seq_len,
                            tokens, BOS_ID, EOS_ID)


def val_rows_for(tokenizer, data: list[str] | None, seq_len: int, max_rows: int | None = None):
    """``{domain: rows [R, seq_len]}`` of ``data``'s validation split (None: the built-in corpus)."""

    out = {}
    for domain, ts in sorted(texts_for(data, 0, "val").items()):
        r = pack_documents([Document(domain, str(i), t) for i, t in enumerate(ts)],
                           lambda b: encode_batch(tokenizer, b), seq_len, BOS_ID, EOS_ID)
        if len(r):
            out[domain] = r[:max_rows] if max_rows else r
    return out


def w8a8_quality(checkpoint: str | Path, tokenizer, seq_len: int, calib_tokens: int = 16384,
                 smoothing: str = "expert-aware", act: str = "static", progress: bool = False):
    """Quantize a float checkpoint in memory and compare it with itself on the built-in corpus's validation
    split (every row of ``seq_len``): returns ``(Quality, QuantizeReport, seconds)``. The demo's W8A8 row."""
    import torch


    t0 = time.perf_counter()
    fp = load_pretrained(checkpoint, dtype=torch.float32)
    q = copy.deepcopy(fp)
    report = quantize(q, calib_rows_for(tokenizer, None, calib_tokens, 256), smoothing=smoothing, act=act,
                      progress=progress)
    quality = compare(fp, q, val_rows_for(tokenizer, None, seq_len), batch_size=16, progress=progress)
    return quality, report, time.perf_counter() - t0


def _check_args(args: argparse.Namespace, ckpt: Path) -> None:
    """Every argument error, named, before any work."""
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist" if not ckpt.exists()
                              else f"{ckpt} is not a checkpoint directory")
    fmt = quantization_format(ckpt)
    if fmt is not None:
        raise QuantError(f"{ckpt} is already quantized ({fmt}); quantize the float checkpoint it was made from")
    resolve_kind_options(args)
    if not args.out and not args.eval:
        raise QuantizeCommandError("nothing to do: give --out DIR (write the quantized checkpoint) and/or --eval")
    if args.out and args.smoothing == "per-expert":
        raise QuantizeCommandError("--smoothing per-expert gives every expert its own input smoothing, which the "
                                   "Ascend W8A8 layout cannot hold (experts sharing an input share one smoothing, "
                                   "folded into its RMSNorm: eq. 10); use it with --eval only")
    if args.out and Path(args.out).resolve() == ckpt.resolve():
        raise QuantizeCommandError(f"--out {args.out} is the source checkpoint; write to a new directory")
    for name in ("calib_tokens", "calib_seq_len", "batch_size", "eval_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise QuantizeCommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_expert_tokens is not None and args.min_expert_tokens < 0:
        raise QuantizeCommandError(f"--min-expert-tokens must be >= 0, got {args.min_expert_tokens}")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise QuantizeCommandError(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0 <= args.seed < 2 ** 63:
        raise QuantizeCommandError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.group_size is not None and args.group_size not in INT4_GROUPS:
        raise QuantizeCommandError(f"--group-size must be one of {', '.join(map(str, INT4_GROUPS))}, got "
                                   f"{args.group_size}")
    if (args.weights == "w8a8" or args.eval) and not (ckpt / "tokenizer.json").is_file():
        need = "calibration" if args.weights == "w8a8" else "--eval"
        raise QuantizeCommandError(f"no tokenizer.json in {ckpt}: {need} needs it to turn text into tokens")


def _w8a8(args: argparse.Namespace, model, tokenizer, ckpt: Path, t0: float) -> tuple[str, dict]:
    """Calibrate and quantize to W8A8 in place; returns ``(label, metadata)``."""
    rows = calib_rows_for(tokenizer, args.calib_data, args.calib_tokens, args.calib_seq_len, args.seed)
    report = quantize(model, rows, args.alpha, args.smoothing, args.act, args.min_expert_tokens, args.batch_size,
                      progress=args.progress)
    print(f"quantized {ckpt} to W8A8 ({args.smoothing} smoothing, alpha {args.alpha}, {args.act} activations) "
          f"on {report.calib_tokens} calibration tokens in {time.perf_counter() - t0:.1f} s")
    starved = report.starved
    if starved:
        n = sum(len(v) for v in starved.values())
        first = next(iter(starved.items()))
        print(f"{n} experts were routed fewer than {args.min_expert_tokens} calibration tokens and were topped up "
              f"with their highest-scoring tokens, e.g. {first[0]}: "
              + ", ".join(f"expert {e} ({c})" for e, c in first[1][:8]))
    return f"W8A8 {args.smoothing}/{args.act}", report.metadata()


def _weight_only(args: argparse.Namespace, model, ckpt: Path, t0: float) -> tuple[str, dict]:
    """Weight-only int8 / int4 in place; returns ``(label, metadata)``."""
    bits = 8 if args.weights == "int8" else 4
    group = quantize_weights(model, bits, args.group_size, args.head)
    label = f"int{bits}" + (f" g{group}" if group else "") + (" +head" if args.head else "")
    print(f"quantized {ckpt} to weight-only int{bits} ("
          + (f"groups of {group} inputs" if group else "one scale per output channel")
          + f", output head {'int' + str(bits) if args.head else 'float'}) in {time.perf_counter() - t0:.1f} s")
    return label, {"weights": args.weights, "group_size": group, "head": args.head}


def run(args: argparse.Namespace) -> int:
    import torch


    ckpt = Path(args.checkpoint).expanduser()
    _check_args(args, ckpt)
    tok_path = ckpt / "tokenizer.json"
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None

    t0 = time.perf_counter()
    model = load_pretrained(ckpt, dtype=torch.float32, device=args.device)
    fp = copy.deepcopy(model) if args.eval else None
    if args.weights == "w8a8":
        label, meta = _w8a8(args, model, tokenizer, ckpt, t0)
    else:
        label, meta = _weight_only(args, model, ckpt, t0)
    if args.out:
        tok = tok_path if tokenizer is not None else None
        if args.weights == "w8a8":
            out = save_quantized(args.out, model.config, model.state_dict(), args.max_shard_size, tok,
                                 progress=args.progress, metadata=meta)
        else:
            out = save_weight_only(args.out, model.config, model.state_dict(), args.max_shard_size, tok,
                                   progress=args.progress, metadata=meta)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        layout = "Ascend W8A8" if args.weights == "w8a8" else "compressed-tensors pack-quantized"
        print(f"wrote {out} ({size / 1e6:.1f} MB of weights, {layout} layout)")
    if args.eval:
        val = val_rows_for(tokenizer, args.calib_data, args.calib_seq_len, args.eval_rows)
        if not val:
            raise QuantizeCommandError(f"--eval: the validation split has no full row of {args.calib_seq_len} tokens")
        q = compare(fp, model, val, args.batch_size, progress=args.progress)
        print()
        print(q.table(label))
        if args.out:
            write_json(Path(args.out) / "quality.json", q.to_dict())
    return 0
