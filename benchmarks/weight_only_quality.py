"""Weight-only int8 / int4 quality of a trained MoGE checkpoint, measured like W8A8's (``quant_quality.py``):
per-domain validation loss against fp32, routing agreement and routing KL per MoE layer.

Variants: int8 per output channel and int4 in groups of ``--group-size`` inputs (the largest that divides
every input dim when not given: 32 on the ``tiny`` demo model, whose experts are 96 wide), each with the
output head float and quantized, in the default computation (torch's CPU kernels, bfloat16 activations);
and each without the head quantized in float32 activations (the dequantize oracle's arithmetic), which
separates the weights' error from the activations' rounding. Evaluation: every validation row of
``--seq-len`` tokens of each domain of the built-in corpus. Prints Markdown and writes ``--json``.

Usage: ``PYTHONPATH=src python benchmarks/weight_only_quality.py --checkpoint runs/demo/moge``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from quant_quality import shown_path  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)
from moge.checkpoint import load_pretrained  # noqa: E402
from moge.cli.quantize import texts_for  # noqa: E402
from moge.data.corpus import Document, pack_documents  # noqa: E402
from moge.data.tokenizer import BOS_ID, EOS_ID, encode_batch, load_tokenizer  # noqa: E402
from moge.quant import quantize_weights, set_weight_only  # noqa: E402
from moge.quant.quality import compare  # noqa: E402


def variants(group: int | None) -> list[tuple[str, int, int | None, bool, str]]:
    """``(label, bits, group size, head, activation dtype)``."""
    out = []
    for bits in (8, 4):
        g = group if bits == 4 else None
        name = f"int{bits}" + (f" g{g}" if bits == 4 and g else "")
        out += [(f"{name}", bits, g, False, "bfloat16"), (f"{name} + head", bits, g, True, "bfloat16"),
                (f"{name}, fp32 activations", bits, g, False, "float32")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo/moge")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=128, help="validation row length (the demo trains at 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "results_weight_only_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ck = Path(args.checkpoint)
    tok = load_tokenizer(ck / "tokenizer.json")
    fp = load_pretrained(ck, dtype=torch.float32)
    val = {d: pack_documents([Document(d, str(i), t) for i, t in enumerate(ts)], lambda b: encode_batch(tok, b),
                             args.seq_len, BOS_ID, EOS_ID) for d, ts in sorted(texts_for(None, 0, "val").items())}
    results = {}
    for label, bits, g, head, act in variants(args.group_size):
        q = copy.deepcopy(fp)
        used = quantize_weights(q, bits, g, head=head)
        set_weight_only(q, act_dtype=act)
        r = compare(fp, q, val, batch_size=16)
        results[label] = {**r.to_dict(), "group_size": used}
        print(f"{label:28s} " + " ".join(f"{d} {100 * v:+.3f}%" for d, v in r.relative_loss().items())
              + f"  agreement {[round(100 * a, 2) for a in r.agreement.values()]}", flush=True)
    meta = {"checkpoint": shown_path(ck), "val_tokens": {d: int(v.numel()) for d, v in val.items()},
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
            "seconds": time.perf_counter() - t_start}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(markdown(results, meta))


def markdown(results: dict, meta: dict) -> str:
    first = next(iter(results.values()))
    domains, layers = sorted(first["loss_fp"]), sorted(first["agreement"], key=int)
    lines = ["| variant | " + " | ".join(f"val {d}" for d in domains)
             + " | worst change | routing agreement, worst layer | routing KL, worst layer |",
             "|---|" + "---:|" * (len(domains) + 3),
             "| fp32 | " + " | ".join(f"{first['loss_fp'][d]:.4f}" for d in domains) + " | | | |"]
    for key, r in results.items():
        rel = r["relative_loss"]
        lines.append(f"| {key} | " + " | ".join(f"{r['loss_q'][d]:.4f}" for d in domains)
                     + f" | {100 * max(rel.values(), key=abs):+.2f}% | {100 * min(r['agreement'][i] for i in layers):.2f}% "
                     f"| {max(r['kl'][i] for i in layers):.1e} |")
    lines += ["", "| variant | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---|" + "---:|" * len(layers)]
    for key, r in results.items():
        lines.append(f"| {key} | " + " | ".join(f"{100 * r['agreement'][i]:.2f}% / {r['kl'][i]:.1e}" for i in layers)
                     + " |")
    lines += ["", f"Validation tokens {meta['val_tokens']}; {meta['machine']}; {meta['seconds']:.0f} s in all."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
