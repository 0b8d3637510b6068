"""Plot the share of bad inputs answered by a named error, per family, before and after (from two
``probe_inputs.py --json`` outputs); writes a compact summary JSON and a PNG.

    python benchmarks/plot_probes.py BEFORE.json AFTER.json [--out benchmarks/results_probes]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(path: str) -> dict[str, dict[str, int]]:
    """Outcome counts per family of a probe_inputs.py --json file, or the "before" entry of an earlier
    summary written by this script (so a re-run can be compared with the original baseline)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        return data["before"]
    out: dict[str, dict[str, int]] = {}
    for r in data:
        if r["control"]:
            continue
        c = out.setdefault(r["family"], {"named": 0, "plain": 0, "traceback": 0, "silent": 0})
        c[r["outcome"]] += 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--out", default="benchmarks/results_probes")
    ap.add_argument("--after-label", default="after (issue14)")
    a = ap.parse_args()
    data = {"before": summary(a.before), "after": summary(a.after)}
    Path(a.out + ".json").write_text(json.dumps(data, indent=1) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams = sorted(data["after"])
    # a family added after the baseline has no "before" bar
    pct = {k: [100 * d[f]["named"] / sum(d[f].values()) if f in d else 0.0 for f in fams] for k, d in data.items()}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    x = range(len(fams))
    ax.bar([i - 0.2 for i in x], pct["before"], 0.4, label="before (main 1cbe370)", color="#c44")
    ax.bar([i + 0.2 for i in x], pct["after"], 0.4, label=a.after_label, color="#4a4")
    ax.set_xticks(list(x), [f"{f}\n({sum(data['after'][f].values())})" for f in fams], rotation=45, ha="right",
                  fontsize=8)
    ax.set_ylabel("bad inputs answered by a named MoGEError (%)")
    ax.axhline(98, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 125)
    tot = {k: 100 * sum(d[f]["named"] for f in d) / sum(sum(d[f].values()) for f in d) for k, d in data.items()}
    n = {k: sum(sum(v.values()) for v in d.values()) for k, d in data.items()}
    ax.set_title(f"probe_inputs.py: {tot['before']:.1f}% of {n['before']} -> {tot['after']:.1f}% of "
                 f"{n['after']} bad inputs (probes per family in brackets)", fontsize=10)
    ax.legend(loc="upper center", ncol=2, fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print(f"wrote {a.out}.json and {a.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
