"""W8A8 quality of a trained MoGE checkpoint, measured like the paper: per-domain validation loss against
full precision, routing agreement and routing KL per MoE layer, under each smoothing.

Variants: W8A8 with static activations under ``expert-aware`` (eq. 10), ``per-expert`` and ``none``
smoothing, and ``expert-aware`` with dynamic per-token activations. Each runs on the checkpoint as trained
and on a *function-preserving outlier twin*: three channels of every RMSNorm weight multiplied by 25 and the
matching input columns of every reader divided by 25, so the float model computes the same function
(up to rounding) but its normalized activations have outlier channels, as large LLMs do and the tiny demo
model does not.

Calibration: ``--calib-tokens`` tokens of the built-in corpus's training split in rows of 256 (the
``moge quantize`` defaults); evaluation: every validation row of ``--seq-len`` tokens of each domain.
Writes the Markdown tables (stdout and ``--json``) and ``docs/img/quantization.png``.

Usage: ``PYTHONPATH=src python benchmarks/quant_quality.py --checkpoint runs/demo/moge``
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

from moge.checkpoint import load_pretrained  # noqa: E402
from moge.data.corpus import Document, pack_documents  # noqa: E402
from moge.quant import calibration_rows, quantize  # noqa: E402
from moge.quant.calibrate import decoder_layers  # noqa: E402
from moge.quant.quality import compare  # noqa: E402
from moge.cli.quantize import texts_for  # noqa: E402
from moge.data.tokenizer import BOS_ID, EOS_ID, encode_batch, load_tokenizer  # noqa: E402

VARIANTS = [("expert-aware", "static"), ("per-expert", "static"), ("none", "static"), ("expert-aware", "dynamic")]
# ablation (checkpoint as trained only): smooth only the inputs norms produce, not down-projection / o_proj inputs
ABLATION = ("expert-aware", "static", "norm inputs only")
OUTLIER_CHANNELS, OUTLIER_FACTOR = (5, 61, 99), 25.0


@torch.no_grad()
def outlier_twin(model: torch.nn.Module) -> torch.nn.Module:
    """Same function, outlier activations: norm weight x c on a few channels, readers' columns / c."""
    m = copy.deepcopy(model)
    ch, c = list(OUTLIER_CHANNELS), OUTLIER_FACTOR
    for layer in decoder_layers(m).values():
        layer.input_layernorm.weight[ch] *= c
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight[:, ch] /= c
        layer.post_attention_layernorm.weight[ch] *= c
        mlp = layer.mlp
        readers = [mlp.gate.weight, mlp.experts.gate_up_proj]
        if mlp.shared_expert is not None:
            readers += [mlp.shared_expert.gate_proj.weight, mlp.shared_expert.up_proj.weight]
        for w in readers:
            w[..., ch] /= c
    return m


def shown_path(path: Path) -> str:
    """``path`` as the results file records it: relative to the repository root when it lies inside it,
    else only its last component (a results file names no directory of the machine it ran on)."""
    try:
        return str(path.resolve().relative_to(HERE.parent.resolve()))
    except ValueError:
        return path.resolve().name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo/moge")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=128, help="validation row length (the demo trains at 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "results_quant_quality.json"))
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "img" / "quantization.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ck = Path(args.checkpoint)
    tok = load_tokenizer(ck / "tokenizer.json")

    def enc(texts):
        return encode_batch(tok, texts)

    base = load_pretrained(ck, dtype=torch.float32)
    texts = texts_for(None, 0, "train", budget_chars=16 * args.calib_tokens)
    calib = calibration_rows([t for ts in texts.values() for t in ts], enc, 256, args.calib_tokens, BOS_ID, EOS_ID)
    val = {d: pack_documents([Document(d, str(i), t) for i, t in enumerate(ts)], enc, args.seq_len, BOS_ID, EOS_ID)
           for d, ts in sorted(texts_for(None, 0, "val").items())}
    models = {"as trained": base, "outlier twin": outlier_twin(base)}
    results: dict[str, dict[str, dict]] = {}
    for mname, fp in models.items():
        results[mname] = {}
        runs = [(s, a, None) for s, a in VARIANTS] + ([ABLATION] if mname == "as trained" else [])
        for smoothing, act, note in runs:
            q = copy.deepcopy(fp)
            t0 = time.perf_counter()
            rep = quantize(q, calib, smoothing=smoothing, act=act, progress=False, down_and_o=note is None)
            t_q = time.perf_counter() - t0
            r = compare(fp, q, val, batch_size=16)
            key = f"{smoothing}/{act}" + (f", {note}" if note else "")
            results[mname][key] = {**r.to_dict(), "quantize_s": t_q,
                                   "starved_experts": sum(len(v) for v in rep.starved.values())}
            print(f"{mname:12s} {key:22s} " + " ".join(f"{d} {100 * v:+.3f}%" for d, v in r.relative_loss().items())
                  + f"  agreement {[round(100 * a, 2) for a in r.agreement.values()]}  ({t_q:.1f} s)", flush=True)
    meta = {"checkpoint": shown_path(ck), "calib_tokens": int(calib.numel()), "val_tokens": {d: int(v.numel()) for d, v in val.items()},
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
            "seconds": time.perf_counter() - t_start}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(markdown(results, meta))
    plot(results, Path(args.plot))


def markdown(results: dict, meta: dict) -> str:
    lines = []
    for mname, res in results.items():
        first = next(iter(res.values()))
        domains = sorted(first["loss_fp"])
        layers = sorted(first["agreement"], key=int)
        lines += [f"**{mname}**", "", "| variant | " + " | ".join(f"val {d}" for d in domains)
                  + " | max rel. change | routing agreement (min over layers) | routing KL (max over layers) |",
                  "|---|" + "---:|" * (len(domains) + 3)]
        lines.append("| fp32 | " + " | ".join(f"{first['loss_fp'][d]:.4f}" for d in domains) + " | - | - | - |")
        for key, r in res.items():
            rel = r["relative_loss"]
            lines.append(f"| W8A8 {key} | " + " | ".join(f"{r['loss_q'][d]:.4f} ({100 * rel[d]:+.2f}%)" for d in domains)
                         + f" | {100 * max(abs(v) for v in rel.values()):.2f}% | "
                         f"{100 * min(r['agreement'][i] for i in layers):.2f}% | "
                         f"{max(r['kl'][i] for i in layers):.1e} |")
        lines += ["", "| variant | " + " | ".join(f"layer {i} agreement / KL" for i in layers) + " |",
                  "|---|" + "---:|" * len(layers)]
        for key, r in res.items():
            lines.append(f"| W8A8 {key} | " + " | ".join(f"{100 * r['agreement'][i]:.2f}% / {r['kl'][i]:.1e}"
                                                       for i in layers) + " |")
        lines.append("")
    lines.append(f"Calibration {meta['calib_tokens']} tokens; validation tokens {meta['val_tokens']}; "
                 f"{meta['machine']}; {meta['seconds']:.0f} s in all.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for row, (mname, res) in enumerate(results.items()):
        domains = sorted(next(iter(res.values()))["loss_fp"])
        width = 0.8 / len(res)
        ax = axes[row][0]
        for j, (key, r) in enumerate(res.items()):
            ax.bar([i + j * width for i in range(len(domains))], [100 * r["relative_loss"][d] for d in domains],
                   width, label=key)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
        ax.set_ylabel("val loss change vs fp32 (%)")
        ax.set_title(f"{mname}: validation loss, W8A8 vs fp32")
        ax = axes[row][1]
        for key, r in res.items():
            layers = sorted(r["agreement"], key=int)
            ax.plot([int(i) for i in layers], [100 * r["agreement"][i] for i in layers], marker="o", label=key)
        ax.set_xticks([int(i) for i in layers])
        ax.axhline(95, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("routing agreement with fp32 (%)")
        ax.set_title(f"{mname}: same experts chosen as fp32")
        ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
