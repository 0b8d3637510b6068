"""Fit the Ascend 800I A2's unknown figures to the paper's calibration points, and nothing else.

What is fitted (:data:`FIT_PARAMETERS`), on what (:data:`moge.sim.paper.PAPER_POINTS` with role
``fit``: the 800I A2 decodes at batch 456 / 228 and the three 2-card prefills), and how: least squares
on log(predicted / paper) by coordinate descent (golden-section search per parameter, in log space,
within the bounds, a fixed number of sweeps from fixed starting values), so the result is
deterministic. The held-out points are never evaluated during the fit. ``moge simulate fit`` re-runs
it and compares with the constants stored in :data:`moge.sim.hardware.A2_FITTED`; a test does too.
"""

from __future__ import annotations

import dataclasses
import math

from .hardware import A2_FITTED, PROFILES, HardwareProfile
from .paper import PAPER_MTP, PAPER_POINTS, WEIGHT_READ_SHARE, run_point


# name -> (lower bound, upper bound, start, what it is)
FIT_PARAMETERS: dict[str, tuple[float, float, float, str]] = {
    "attn_mem_eff": (0.05, 1.0, 0.89, "fraction of the assumed 1.6 TB/s HBM peak the decode attention reaches"),
    "matmul_eff": (0.05, 1.0, 0.5, "fraction of the assumed 512 TOPS INT8 peak reached by large GEMMs"),
    "gmm_eff": (0.05, 1.0, 0.5, "the same fraction for the routed experts' grouped matmul"),
}
SWEEPS = 8
_GOLDEN = (math.sqrt(5) - 1) / 2


def calibration_points():
    return [p for p in PAPER_POINTS if p.role == "fit"]


def objective(hw: HardwareProfile, points) -> float:
    """Sum over ``points`` of log(predicted / paper)^2."""
    total = 0.0
    for p in points:
        total += math.log(p.predicted(run_point(p, hw)) / p.value) ** 2
    return total


def _golden(fn, lo: float, hi: float, iters: int = 30) -> float:
    """Minimiser of a unimodal ``fn`` on [lo, hi] (log-space coordinates)."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = fn(d)
    return (a + b) / 2


def fit(base: HardwareProfile | None = None, params: dict = FIT_PARAMETERS, sweeps: int = SWEEPS) -> dict[str, float]:
    """Fitted values of ``params`` for the 800I A2 profile ``base`` on the calibration points only."""
    base = base or PROFILES["ascend-800i-a2"]
    points = calibration_points()
    x = {k: math.log(v[2]) for k, v in params.items()}

    def at(vals: dict[str, float]) -> HardwareProfile:
        return dataclasses.replace(base, **{k: math.exp(v) for k, v in vals.items()})

    for _ in range(sweeps):
        for name, (lo, hi, _, _) in params.items():
            x[name] = _golden(lambda v: objective(at({**x, name: v}), points), math.log(lo), math.log(hi))
    return {k: math.exp(v) for k, v in x.items()}


def rounded(values: dict[str, float]) -> dict[str, float]:
    """The precision the constants are stored with (3 significant digits, bandwidth in whole GB/s)."""
    return {k: round(v) if k == "mem_bw_gbs" else float(f"{v:.3g}") for k, v in values.items()}


def describe_fit(profiles: dict | None = None) -> str:
    """One paragraph: every fitted number, what it is, and what it was fitted to."""
    pts = ", ".join(p.label.replace("800I A2 ", "") for p in PAPER_POINTS if p.role == "fit")
    lines = [f"FITTED on the 800I A2 calibration points only ({pts}):"]
    hw = (profiles or {}).get("ascend-800i-a2") or PROFILES["ascend-800i-a2"]
    for k, (_, _, _, what) in FIT_PARAMETERS.items():
        lines.append(f"  {k} = {getattr(hw, k):g}  ({what}; stored {A2_FITTED[k]:g})")
    lines.append("Not fitted (a priori): 800I A2 peaks 512 TOPS INT8 and 1.6 TB/s "
                 "HBM, 15 us per HCCS message step, 5 us per operator launch, GEMM-weight and vector memory "
                 "efficiencies 0.95 / 0.89; 300I Duo: everything (the paper's 95% / 89% memory efficiencies, "
                 "the 800I A2's fitted GEMM efficiencies, 25 us per PCIe step).")
    return "\n".join(lines)


def format_table(rows: list[dict], profiles: dict[str, HardwareProfile] | None = None) -> str:
    """Markdown tables of :func:`paper_comparison`: calibration points, then held-out points."""
    out = [describe_fit(profiles), ""]
    for role, title in (("fit", "Calibration points (the fitted figures were set on these)"),
                        ("held-out", "Held-out points (predicted with no further fitting)")):
        sel = [r for r in rows if r["role"] == role]
        out += [f"### {title}", "", "| point | cards (chips) | metric | paper | simulator | error |",
                "|---|---:|---|---:|---:|---:|"]
        for r in sel:
            out.append(f"| {r['label']} | {r['cards']} ({r['chips']}) | {r['metric']} | {r['paper']:,.2f} | "
                       f"{r['predicted']:,.2f} | {r['error']:+.1%} |")
        errs = [abs(r["error"]) for r in sel]
        out += ["", f"largest |error| {max(errs):.1%}, mean |error| {sum(errs) / len(errs):.1%} over {len(sel)} points", ""]
    first = next(r for r in rows if r["label"].startswith("800I A2 MoE decode, batch 456"))
    out.append(f"Check (not fitted): weight reading is {first['weight_read_share']:.0%} of the simulated batch-456 "
               f"MoE decode step; the paper says about {WEIGHT_READ_SHARE:.0%}.")
    out.append(f"MTP: depth {PAPER_MTP.depth}, acceptance {PAPER_MTP.acceptance} (ASSUMPTION: DeepSeek-V3's "
               f"reported 85-90% second-token acceptance, lower end; the paper gives none).")
    return "\n".join(out)
