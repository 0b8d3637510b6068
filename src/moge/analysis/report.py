"""Plots and a Markdown report comparing training runs (MoGE against top-K) from their ``metrics.jsonl``.

Everything is read back from the runs' metrics files, so a report can be rebuilt from finished runs
without retraining. Plots are PNGs drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


COLORS = {"moge": "tab:blue", "topk": "tab:red", "group_limited": "tab:green"}


@dataclass
class RunMetrics:
    """The parsed ``metrics.jsonl`` of one run."""
    name: str
    start: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    @property
    def num_groups(self) -> int:
        mc = self.start.get("model_config", {})
        return mc.get("num_groups") or mc.get("num_experts_per_tok", 1)

    @property
    def num_experts(self) -> int:
        return self.start.get("model_config", {}).get("num_experts", 0)

    @property
    def top_k(self) -> int:
        return self.start.get("model_config", {}).get("num_experts_per_tok", 1)

    def moe_layers(self) -> list[int]:
        return [l["layer"] for l in self.train[-1]["layers"] if not l.get("dense")] if self.train else []

    def layer_series(self, key: str, layer: int) -> tuple[list[int], list[float]]:
        steps, vals = [], []
        for r in self.train:
            for l in r["layers"]:
                if l["layer"] == layer and not l.get("dense"):
                    steps.append(r["step"])
                    vals.append(l[key])
        return steps, vals


def read_metrics(path: str | Path, name: str | None = None) -> RunMetrics:
    """Parse a run directory's (or file's) ``metrics.jsonl``; a cut-off last line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    start, train, evals = {}, [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = r.get("type")
        if kind == "start":
            start = r
        elif kind == "train":
            train.append(r)
        elif kind == "eval":
            evals.append(r)
    return RunMetrics(name or path.parent.name, start, train, evals)


def summarize(run: RunMetrics) -> dict[str, Any]:
    """Final validation loss per domain and balance statistics over every logged step and layer."""
    final = run.evals[-1] if run.evals else {"val_loss": {}, "val_loss_mean": float("nan")}
    is_all = [l["imbalance_score"] for r in run.train for l in r["layers"] if not l.get("dense")]
    is_max = [l["imbalance_score_max"] for r in run.train for l in r["layers"] if not l.get("dense")]
    mm_all = [l["max_mean_load"] for r in run.train for l in r["layers"] if not l.get("dense")]
    mm_max = [l["max_mean_load_max"] for r in run.train for l in r["layers"] if not l.get("dense")]
    rates = [r["tokens_per_s"] for r in run.train]
    return {"name": run.name, "steps": run.train[-1]["step"] if run.train else 0,
            "val_loss": final["val_loss"], "val_loss_mean": final["val_loss_mean"],
            "final_train_loss": run.train[-1]["loss"] if run.train else float("nan"),
            "mean_is": sum(is_all) / len(is_all) if is_all else float("nan"),
            "max_is": max(is_max) if is_max else float("nan"),
            "mean_max_mean_load": sum(mm_all) / len(mm_all) if mm_all else float("nan"),
            "max_max_mean_load": max(mm_max) if mm_max else float("nan"),
            "tokens_per_s": sum(rates) / len(rates) if rates else float("nan"),
            "parameters": run.start.get("parameters", {})}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(ax, runs: list[RunMetrics]) -> None:
    """Training loss (solid) and mean validation loss (markers) of each run against the step."""
    for run in runs:
        c = COLORS.get(run.name)
        ax.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=c, label=f"{run.name} train")
        ax.plot([r["step"] for r in run.evals], [r["val_loss_mean"] for r in run.evals], "o--", color=c,
                label=f"{run.name} val (mean of domains)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_layer_metric(ax, runs: list[RunMetrics], key: str, title: str, ylabel: str) -> None:
    """``key`` of every MoE layer over training; one line per (run, layer), shade darker for deeper layers."""
    for run in runs:
        layers = run.moe_layers()
        for j, layer in enumerate(layers):
            steps, vals = run.layer_series(key, layer)
            alpha = 0.35 + 0.65 * (j + 1) / len(layers)
            ax.plot(steps, vals, color=COLORS.get(run.name), alpha=alpha,
                    label=f"{run.name}" if j == len(layers) - 1 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_group_loads(ax, runs: list[RunMetrics]) -> None:
    """Per-group (= per-device) share of token-expert pairs in the last logged step, per layer."""
    width = 0.8 / max(len(runs), 1)
    ticks, labels = [], []
    for i, run in enumerate(runs):
        last = run.train[-1]
        m = run.num_groups
        for j, l in enumerate(x for x in last["layers"] if not x.get("dense")):
            total = sum(l["group_loads"]) or 1
            xs = [j * (m + 1) + g + i * width for g in range(m)]
            ax.bar(xs, [v / total for v in l["group_loads"]], width=width, color=COLORS.get(run.name),
                   label=run.name if j == 0 else None)
            if i == 0:
                ticks.append(j * (m + 1) + (m - 1) / 2)
                labels.append(f"layer {l['layer']}")
    if runs:
        ax.axhline(1 / runs[0].num_groups, color="k", lw=0.8, ls=":", label="balanced")
    ax.set_xticks(ticks, labels)
    ax.set_ylabel("share of token-expert pairs")
    ax.set_title(f"Per-group (device) load, last logged step (step {runs[0].train[-1]['step'] if runs else 0})")
    ax.legend(fontsize=8)


def expert_share(run: RunMetrics, layer: int) -> tuple[list[str], list[list[float]]]:
    """Per-domain fraction of tokens routed to each expert in ``layer`` (final evaluation; uniform K/N)."""
    final = run.evals[-1]
    domains = sorted(final["expert_counts"])
    rows = []
    for d in domains:
        counts = final["expert_counts"][d][layer]
        tokens = sum(counts) / run.top_k if counts else 1
        rows.append([c / tokens for c in counts])
    return domains, rows


def plot_expert_share(fig, axes, runs: list[RunMetrics], layers: list[int]) -> None:
    """Heat maps of per-domain expert token share, one panel per (run, layer); lines mark group edges."""
    vmax = 0.0
    data = {}
    for run in runs:
        for layer in layers:
            data[run.name, layer] = expert_share(run, layer)
            vmax = max(vmax, max(max(r) for r in data[run.name, layer][1]))
    im = None
    for ax, (run, layer) in zip(axes, [(r, l) for r in runs for l in layers]):
        domains, rows = data[run.name, layer]
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        g = run.num_experts // run.num_groups
        for b in range(1, run.num_groups):
            ax.axvline(b * g - 0.5, color="w", lw=1.2)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("expert")
        ax.set_title(f"{run.name}, layer {layer} (uniform = {run.top_k / run.num_experts:.2f})", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="fraction of tokens")


def write_plots(out: Path, runs: list[RunMetrics]) -> dict[str, str]:
    """Write every PNG of the report into ``out``; returns {name: filename}."""
    plt = _plt()
    files = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_loss(ax, runs)
    for run in runs:  # per-domain validation curves, thin
        for d in sorted(run.evals[-1]["val_loss"]) if run.evals else []:
            ax.plot([r["step"] for r in run.evals], [r["val_loss"][d] for r in run.evals], ":",
                    color=COLORS.get(run.name), lw=0.8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    files["loss"] = "loss.png"

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_layer_metric(axes[0], runs, "imbalance_score", "Imbalance Score per layer (devices = groups)", "IS")
    plot_layer_metric(axes[1], runs, "max_mean_load", "Max/mean device load per layer", "max / mean")
    fig.tight_layout()
    fig.savefig(out / "balance.png", dpi=110)
    plt.close(fig)
    files["balance"] = "balance.png"

    fig, ax = plt.subplots(figsize=(9, 4))
    plot_group_loads(ax, runs)
    fig.tight_layout()
    fig.savefig(out / "group_loads.png", dpi=110)
    plt.close(fig)
    files["group_loads"] = "group_loads.png"

    if all(r.evals for r in runs):
        layers = runs[0].moe_layers()
        pick = [layers[0], layers[-1]] if len(layers) > 1 else layers
        fig, axes = plt.subplots(len(runs), len(pick), figsize=(6 * len(pick), 3.0 * len(runs) + 0.8), squeeze=False)
        fig.subplots_adjust(hspace=0.45)
        plot_expert_share(fig, axes.flatten(), runs, pick)
        fig.savefig(out / "expert_share.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        files["expert_share"] = "expert_share.png"

    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 2)
    plot_loss(fig.add_subplot(grid[0, 0]), runs)
    plot_layer_metric(fig.add_subplot(grid[0, 1]), runs, "imbalance_score",
                      "Imbalance Score per layer (MoGE: exactly 0)", "IS")
    plot_layer_metric(fig.add_subplot(grid[1, 0]), runs, "max_mean_load", "Max/mean device load per layer",
                      "max / mean")
    plot_group_loads(fig.add_subplot(grid[1, 1]), runs)
    fig.suptitle("MoGE vs top-K: same model, same data, same parameters; only the router differs")
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=100)
    plt.close(fig)
    files["overview"] = "overview.png"
    return files


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table: final validation loss per domain, mean IS, max IS and max/mean device load."""
    domains = sorted({d for s in summaries for d in s["val_loss"]})
    head = ["router", *[f"val {d}" for d in domains], "val mean", "mean IS", "max IS", "mean max/mean load",
            "worst max/mean load", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [s["name"], *[_fmt(s["val_loss"].get(d, float("nan"))) for d in domains], _fmt(s["val_loss_mean"]),
               _fmt(s["mean_is"], 4), _fmt(s["max_is"], 4), _fmt(s["mean_max_mean_load"]),
               _fmt(s["max_max_mean_load"]), f"{s['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(out: str | Path, run_dirs: dict[str, str | Path], samples: dict[str, list[tuple[str, str]]] | None = None,
                 timings: dict[str, float] | None = None, notes: list[str] | None = None) -> tuple[Path, list[dict]]:
    """Write ``out/report.md`` and its PNGs from the runs' metrics; returns (report path, summaries)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_metrics(d, name) for name, d in run_dirs.items()]
    files = write_plots(out, runs)
    summaries = [summarize(r) for r in runs]
    first = runs[0].start
    mc, tc = first.get("model_config", {}), first.get("train_config", {})
    params = summaries[0]["parameters"]
    lines = ["# MoGE vs top-K on the built-in corpus", ""]
    lines += [f"Model: `{tc.get('preset')}` preset, {mc.get('num_hidden_layers')} layers, hidden {mc.get('hidden_size')}, "
              f"{mc.get('num_experts')} experts in {runs[0].num_groups} groups, K = {mc.get('num_experts_per_tok')} "
              f"(MoGE: K' = {mc.get('num_experts_per_tok', 0) // max(runs[0].num_groups, 1)} per group), "
              f"vocabulary {mc.get('vocab_size')}. "
              f"Parameters: {params.get('total', 0) / 1e6:.2f}M total, {params.get('activated', 0) / 1e6:.2f}M "
              f"activated, identical for every router. Training: {tc.get('steps')} steps x {tc.get('batch_size')} "
              f"x {tc.get('seq_len')} tokens, AdamW lr {tc.get('lr')} (warm-up {tc.get('warmup')}, cosine to 10%), "
              f"aux-loss coefficient {mc.get('router_aux_loss_coef')}, seed {tc.get('seed')}.", ""]
    lines += ["Imbalance Score IS = (max - min device load) / tokens with one group per device (docs/design.md section 3); "
              "IS and max/mean load are measured on every training micro-batch and every MoE layer.", ""]
    lines += ["## Summary", "", summary_table(summaries), ""]
    if timings:
        lines += ["Wall-clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    for note in notes or []:
        lines += [note, ""]
    lines += ["## Overview", "", f"![overview]({files['overview']})", ""]
    lines += ["## Loss", "", "Solid: training loss (mean over each logging interval); markers: mean validation loss "
              "over the domains; dotted: validation loss per domain.", "", f"![loss]({files['loss']})", ""]
    lines += ["## Device balance per layer over training", "", f"![balance]({files['balance']})", ""]
    lines += ["## Per-group load of the last batch", "", f"![group loads]({files['group_loads']})", ""]
    if "expert_share" in files:
        lines += ["## Expert token share per domain", "",
                  "Fraction of validation tokens of each domain routed to each expert, in a shallow and a deep "
                  "layer; white lines separate the groups (devices).", "", f"![expert share]({files['expert_share']})", ""]
    if samples:
        lines += ["## Samples", ""]
        for name, pairs in samples.items():
            lines += [f"**{name}**", ""]
            for prompt, text in pairs:
                lines += ["```", prompt + text, "```"]
            lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path, summaries
