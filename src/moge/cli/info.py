"""Print a model's architecture and its total / activated parameter counts (no weights allocated).

Takes a preset name (``debug``, ``tiny``, ``small``, ``pangu-pro-moe-72b``) or a checkpoint directory /
``config.json`` path.
"""

from __future__ import annotations

import argparse
import json

from ..config import resolve_config
from ..model import count_parameters


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name, checkpoint directory or config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.model)
    counts = count_parameters(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), **counts}))
        return 0
    print(f"layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} (q/kv), head dim {cfg.resolved_head_dim}, vocab {cfg.vocab_size}")
    print(f"router {cfg.router}: {cfg.num_experts} experts in {cfg.groups} groups, K={cfg.num_experts_per_tok}"
          f" (K'={cfg.k_per_group} per group), expert F={cfg.moe_intermediate_size}, "
          f"shared F={cfg.shared_expert_intermediate_size}")
    def fmt(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    print(f"parameters: {fmt(counts['total'])} total, {fmt(counts['activated'])} activated per token")
    return 0
