"""Plot training with and without MTP from ``moge train`` metrics: the main head's validation loss (mean
over domains) of every run, and each MTP predictor's validation top-1 accuracy; prints a Markdown table
of the final numbers and the wall time of each run.

    python benchmarks/plot_mtp_training.py base=runs/mtp/base mtp1=runs/mtp/mtp1 \
        [base-s1=... mtp1-s1=...] [--out docs/img/mtp_training.png]

A run whose label contains "mtp" is drawn solid, the others dashed; runs with the same seed share a colour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run_dir: str) -> dict:
    """The start, train and eval lines of ``run_dir/metrics.jsonl``."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"start": next(r for r in rows if r["type"] == "start"),
            "train": [r for r in rows if r["type"] == "train"], "eval": [r for r in rows if r["type"] == "eval"]}


def summary_rows(runs: dict[str, dict]) -> list[str]:
    """Markdown rows: run, seed, --mtp, final main val loss (mean and per domain), predictors' val top-1."""
    out = ["| run | seed | --mtp | main val loss (mean) | per domain | MTP val loss | MTP val top-1 | train wall |",
           "|---|---|---|---|---|---|---|---|"]
    for label, m in runs.items():
        cfg, last = m["start"]["train_config"], m["eval"][-1]
        dom = ", ".join(f"{k} {v:.3f}" for k, v in last["val_loss"].items())
        mtp = last.get("mtp", [])
        loss = " / ".join(f"{p['val_loss_mean']:.3f}" for p in mtp) or "-"
        acc = " / ".join(f"{p['val_accuracy_mean']:.3f}" for p in mtp) or "-"
        wall = m["train"][-1]["elapsed_s"]
        out.append(f"| {label} | {cfg['seed']} | {cfg.get('mtp', 0)} | {last['val_loss_mean']:.4f} | {dom} | {loss} | "
                   f"{acc} | {wall / 60:.1f} min |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=DIR")
    ap.add_argument("--out", default="docs/img/mtp_training.png")
    a = ap.parse_args()
    runs = {}
    for spec in a.runs:
        label, _, d = spec.partition("=")
        runs[label] = read(d)
    print("\n".join(summary_rows(runs)))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({m["start"]["train_config"]["seed"] for m in runs.values()})
    colour = {s: c for s, c in zip(seeds, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"])}
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for label, m in runs.items():
        c = colour[m["start"]["train_config"]["seed"]]
        style = "-" if "mtp" in label else "--"
        ev = [r for r in m["eval"] if r["step"] > 0]
        ax_l.plot([r["step"] for r in ev], [r["val_loss_mean"] for r in ev], style, color=c, marker=".", label=label)
        for p in range(len(ev[-1].get("mtp", []))):
            ax_a.plot([r["step"] for r in ev], [r["mtp"][p]["val_accuracy_mean"] for r in ev], "-", color=c,
                      marker=".", label=f"{label} predictor {p + 1} (val)")
            tr = m["train"]
            ax_a.plot([r["step"] for r in tr], [r["mtp"][p]["accuracy"] for r in tr], "-", color=c, alpha=0.25,
                      label=f"{label} predictor {p + 1} (train)")
    ax_l.set(xlabel="step", ylabel="main-head validation loss (mean over domains)",
             title="main head: without (dashed) and with MTP (solid)")
    ax_l.set_ylim(top=min(ax_l.get_ylim()[1], 7.0))
    ax_a.set(xlabel="step", ylabel="top-1 accuracy of token t+2", title="MTP predictor accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
