"""Figures of ``moge analyze`` (the paper's Figures 7-10) from :func:`moge.analysis.analyze.summarize` results.

Each function draws one PNG from the JSON-ready summaries (``{"main": ..., "compare": ...}``), so the
figures can be rebuilt from ``analysis.json`` without touching a model. matplotlib's Agg backend only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


COLORS = {"main": "tab:blue", "compare": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: dict) -> str:
    name = Path(r["checkpoint"]).name
    return r["router"] if name == r["router"] else f"{r['router']} ({name})"


def _integer_ticks(ax, x: bool = True, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _group_lines(ax, r: dict, vertical: bool = True, horizontal: bool = False, color: str = "k") -> None:
    g = r["num_experts"] // r["num_groups"]
    for b in range(1, r["num_groups"]):
        if vertical:
            ax.axvline(b * g - 0.5, color=color, lw=0.8)
        if horizontal:
            ax.axhline(b * g - 0.5, color=color, lw=0.8)


def plot_expert_share(path: Path, results: dict) -> None:
    """Heat maps of each domain's expert token share, layers x experts, one row per checkpoint; the
    colour scale is centred on the uniform share K/N (white), groups separated by lines."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _plt()
    runs = list(results.values())
    domains = runs[0]["domains"]
    fig, axes = plt.subplots(len(runs), len(domains), figsize=(3.6 * len(domains) + 1.4, 1.2 + (1.0 + 0.3 * len(
        runs[0]["layers"])) * len(runs)), squeeze=False, layout="constrained")
    vmax = max(max(max(row) for l in r["layers"] for row in l["share_by_domain"]) for r in runs)
    uniform = runs[0]["uniform_token_share"]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(vmax, uniform * 1.01))
    im = None
    for row, r in enumerate(runs):
        layers = [l["layer"] for l in r["layers"]]
        for col, dom in enumerate(r["domains"]):
            ax = axes[row, col]
            mat = np.array([l["share_by_domain"][col] for l in r["layers"]])
            im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            _group_lines(ax, r)
            _integer_ticks(ax)
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            ax.set_title(f"{_label(r)}: {dom}", fontsize=9)
            if row == len(runs) - 1:
                ax.set_xlabel("expert")
            if col == 0:
                ax.set_ylabel("layer")
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
    cb.set_label("fraction of the domain's tokens")
    cb.ax.axhline(uniform, color="k", lw=1.5)
    cb.set_ticks(sorted({0.0, uniform, *np.linspace(0, norm.vmax, 5).round(2)}))
    cb.ax.set_yticklabels([f"K/N={t:.3f}" if t == uniform else f"{t:.2f}" for t in cb.get_ticks()], fontsize=8)
    fig.suptitle("Expert token share per layer and domain (white = uniform K/N; lines: group edges)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coactivation(path: Path, results: dict) -> None:
    """Co-activation of expert pairs (fraction of tokens choosing both; diagonal blanked) in the first
    and last MoE layer; group blocks outlined (MoGE with K' = 1: zero inside every block)."""
    plt = _plt()
    runs = list(results.values())
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 4.4 * len(runs)), squeeze=False)
    for row, r in enumerate(runs):
        for col, l in enumerate([r["layers"][0], r["layers"][-1]]):
            ax = axes[row, col]
            mat = np.array(l["coactivation"])
            np.fill_diagonal(mat, np.nan)
            im = ax.imshow(mat, cmap="magma", vmin=0.0, interpolation="nearest")
            _group_lines(ax, r, horizontal=True, color="c")
            _integer_ticks(ax, y=True)
            ax.set_title(f"{_label(r)}, layer {l['layer']}: within-group max {l['max_coactivation_within_group']:.3f}",
                         fontsize=9)
            ax.set_xlabel("expert j")
            ax.set_ylabel("expert i")
            fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of tokens choosing i and j")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_within_group(path: Path, r: dict) -> None:
    """Each expert's share of its group's tokens over the layers, one panel per group (uniform 1/G)."""
    plt = _plt()
    m, g = r["num_groups"], r["num_experts"] // r["num_groups"]
    cols = min(m, 4)
    rows = -(-m // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False, sharey=True)
    layers = [l["layer"] for l in r["layers"]]
    cmap = _plt().get_cmap("tab20")
    for b in range(m):
        ax = axes[b // cols, b % cols]
        bottom = np.zeros(len(layers))
        for e in range(g):
            vals = np.array([l["within_group_share"][b][e] for l in r["layers"]])
            ax.bar(range(len(layers)), vals, bottom=bottom, color=cmap(e % 20), width=0.8,
                   label=f"expert {b * g + e}")
            bottom += vals
        for q in range(1, g):
            ax.axhline(q / g, color="k", ls=":", lw=0.8)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_title(f"group {b}", fontsize=9)
        ax.set_xlabel("layer")
        ax.legend(fontsize=6, loc="upper right")
    for b in range(m, rows * cols):
        axes[b // cols, b % cols].axis("off")
    axes[0, 0].set_ylabel("share of the group's tokens (stacked)")
    fig.suptitle(f"{_label(r)}: within-group share per layer (dotted: uniform 1/G = {1 / g:.3f} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_busiest(path: Path, results: dict) -> None:
    """Busiest expert's and busiest device's share of token-expert pairs per layer, over all the data
    (solid) and the mean of per-batch maxima (dashed), for each checkpoint."""
    plt = _plt()
    runs = list(results.items())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, r in runs:
        layers = [l["layer"] for l in r["layers"]]
        c = COLORS.get(label)
        for ax, key in ((axes[0], "expert"), (axes[1], "device")):
            ax.plot(layers, [l[f"busiest_{key}_share"] for l in r["layers"]], "o-", color=c,
                    label=f"{_label(r)}: all tokens")
            ax.plot(layers, [l[f"batch_busiest_{key}_share_mean"] for l in r["layers"]], "s--", color=c,
                    alpha=0.7, label=f"{_label(r)}: per batch (mean)")
    r0 = runs[0][1]
    axes[0].axhline(r0["uniform_expert_share"], color="k", ls=":", label=f"uniform 1/N = {r0['uniform_expert_share']:.3f}")
    axes[1].axhline(r0["uniform_device_share"], color="k", ls=":", label=f"uniform 1/D = {r0['uniform_device_share']:.3f}")
    axes[0].set_title("Busiest expert's share of token-expert pairs")
    axes[1].set_title(f"Busiest device's share ({r0['devices']} devices, contiguous expert blocks)")
    for ax in axes:
        _integer_ticks(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel("share")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_specialisation(path: Path, results: dict) -> None:
    """Specialisation index per layer (0: every domain routes alike) and each domain's distance from
    uniform routing (dotted), for each checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, r in results.items():
        layers = [l["layer"] for l in r["layers"]]
        c = COLORS.get(label)
        ax.plot(layers, [l["specialisation_index"] for l in r["layers"]], "o-", color=c,
                label=f"{_label(r)}: specialisation index")
        for j, dom in enumerate(r["domains"]):
            ax.plot(layers, [l["distance_from_uniform"][dom] for l in r["layers"]], ":", color=c,
                    marker="x^v+*"[j % 5], alpha=0.7, label=f"{_label(r)}: {dom} vs uniform")
    _integer_ticks(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("total-variation distance")
    ax.set_title("Domain specialisation per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(out: Path, results: dict) -> dict[str, str]:
    """Write every PNG into ``out``; returns ``{figure: file name}``."""
    out = Path(out)
    files = {"expert_share": "expert_share.png", "coactivation": "coactivation.png", "busiest": "busiest.png",
             "specialisation": "specialisation.png"}
    plot_expert_share(out / files["expert_share"], results)
    plot_coactivation(out / files["coactivation"], results)
    plot_busiest(out / files["busiest"], results)
    plot_specialisation(out / files["specialisation"], results)
    for label, r in results.items():
        name = f"within_group_share{'' if label == 'main' else '_' + label}.png"
        plot_within_group(out / name, r)
        files[f"within_group_share_{label}"] = name
    return files
