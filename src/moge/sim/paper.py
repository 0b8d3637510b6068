"""The simulator against the paper's inference numbers on Ascend 800I A2 (spec section 7).

Every point: 4 cards, W8A8 (int8 weights and GEMMs), int8 KV cache, 2K-token context, default H2P-style
layout. The int8 KV cache is an assumption forced by capacity: Pangu Pro MoE at batch 456 x 2K needs 46 GB
of bf16 KV cache per card plus 18 GB of int8 weights, more than a 64 GB card; the paper mentions KV-cache
compression.
"""

from __future__ import annotations

from .hardware import HardwareProfile
from .perf import resolve_model, simulate

# (label, model, phase, batch, paper value, unit): unit "ms" compares step time, "tps" tokens/s per card
PAPER_POINTS = [
    ("Pangu Pro MoE decode, batch 456", "pangu-pro-moe-72b", "decode", 456, 99.3, "ms"),
    ("Pangu Pro MoE decode, batch 456", "pangu-pro-moe-72b", "decode", 456, 1148.0, "tps"),
    ("Pangu Pro MoE decode, batch 1", "pangu-pro-moe-72b", "decode", 1, 18.4, "ms"),
    ("Pangu Pro MoE prefill, batch 2 x 2K", "pangu-pro-moe-72b", "prefill", 2, 4828.0, "tps"),
    ("72B dense decode, batch 228", "dense-72b", "decode", 228, 583.0, "tps"),
    ("72B dense prefill, batch 2 x 2K", "dense-72b", "prefill", 2, 1596.0, "tps"),
]
CARDS, CONTEXT = 4, 2048


def paper_comparison(hw: HardwareProfile) -> list[dict]:
    """One row per paper number: the prediction, the paper's value and the relative error."""
    rows = []
    for label, model, phase, batch, ref, unit in PAPER_POINTS:
        res = simulate(resolve_model(model), hw, CARDS, phase, batch, CONTEXT, "int8", kv_cache="int8")
        pred = res.step_ms if unit == "ms" else res.tokens_per_s_per_card
        rows.append({"label": label, "model": model, "phase": phase, "batch": batch, "cards": CARDS,
                     "context": CONTEXT, "metric": "ms per step" if unit == "ms" else "tokens/s per card",
                     "paper": ref, "predicted": pred, "error": pred / ref - 1, "step_ms": res.step_ms,
                     "memory_gb_per_card": res.memory_gb["total"]})
    return rows


def format_table(rows: list[dict], hw: HardwareProfile) -> str:
    """A Markdown table of :func:`paper_comparison`."""
    out = [f"{hw.description}: matmul_eff={hw.matmul_eff}, mem_eff={hw.mem_eff}, comm_eff={hw.comm_eff}, "
           f"latency={hw.link_latency_us} us/collective, overhead={hw.op_overhead_us} us/op",
           "", "| point | metric | paper | simulator | error |", "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['metric']} | {r['paper']:,.1f} | {r['predicted']:,.1f} | {r['error']:+.1%} |")
    return "\n".join(out)
