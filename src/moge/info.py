"""Print a model's architecture and its total / activated parameter counts (no weights allocated).

Takes a preset name (``debug``, ``tiny``, ``small``, ``pangu-pro-moe-72b``) or a checkpoint directory /
``config.json`` path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name, checkpoint directory or config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def resolve_config(spec: str):
    """A :class:`MoGEConfig` from a preset name or a path to a checkpoint directory / config.json."""
    from .config import PRESETS, MoGEConfig, get_config

    if spec in PRESETS:
        return get_config(spec)
    if Path(spec).exists():
        return MoGEConfig.from_json(spec)
    raise FileNotFoundError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path")


def run(args: argparse.Namespace) -> int:
    from .model import count_parameters

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
    print(f"parameters: {counts['total'] / 1e9:.2f}B total, {counts['activated'] / 1e9:.2f}B activated per token")
    return 0
