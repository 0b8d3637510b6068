"""Train a MoGE (or top-K / group-limited baseline) language model on text, with resumable checkpoints.

The output directory is itself a checkpoint in the released layout (``config.json`` + safetensors
weights, loadable by ``moge.checkpoint.load_pretrained`` and transformers' Auto classes) plus
``tokenizer.json`` with the ``generation_config.json`` / ``tokenizer_config.json`` /
``special_tokens_map.json`` that transformers' tools read, the optimizer state
(``optimizer.safetensors``, tensors keyed ``"{param}.exp_avg"`` / ``"{param}.exp_avg_sq"``) and
``moge_training_state.json`` (step, schedule, data position, RNG states, per-file checksums). No
pickle. Checkpoints are committed atomically by :mod:`moge.checkpoint.training_state`. Under torchrun
(``--dp-shard D --ep E``, :mod:`moge.parallel.fsdp`) the weights and AdamW moments are DCP shards in
``DIR/dcp/`` instead (``moge convert`` makes the released layout); ``--dry-run`` prints the per-rank
memory plan (:mod:`moge.parallel.plan`) and exits.

Metrics go to ``DIR/metrics.jsonl`` (one JSON object per line): ``type: "train"`` lines with the loss,
auxiliary loss, learning rate, tokens/s and, for every layer, the Imbalance Score with devices = groups,
max/mean device load, per-group loads and per-expert counts; ``type: "eval"`` lines with the
validation loss and expert counts per data domain. With ``--mtp N`` the loss adds ``--mtp-coef`` times
the mean loss of N multi-token-prediction predictors, whose loss, top-1 accuracy and layer balance are
logged beside the main head's (:mod:`moge.train.mtp`).

The package: :mod:`~moge.train.options` (``TrainConfig``, flags), :mod:`~moge.train.setup` (model,
optimizer, data), :mod:`~moge.train.trainer` (the loop), :mod:`~moge.train.checkpointing`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

import torch

from .. import validate as V
from ..parallel import fault_guard, init_distributed
from .options import (MAX_VOCAB, METRICS_FILE, MIN_VOCAB, RESUMABLE_OVERRIDES, TrainConfig, TrainingConfigError,
                      TrainingDivergedError, add_arguments, config_from_args, lr_at, resolve_device)
from .setup import (DataBundle, build_model, build_optimizer, data_fingerprint, dry_run_report, estimate_training_bytes,
                    prepare_data)
from .trainer import Trainer


__all__ = ["MAX_VOCAB", "METRICS_FILE", "MIN_VOCAB", "DataBundle", "RESUMABLE_OVERRIDES", "TrainConfig", "Trainer", "TrainingConfigError",
           "TrainingDivergedError", "add_arguments", "build_model", "build_optimizer", "config_from_args",
           "data_fingerprint", "dry_run_report", "estimate_training_bytes", "lr_at", "prepare_data", "resolve_device", "run"]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``moge train``."""
    cfg = config_from_args(args)
    if getattr(args, "dry_run", False):
        print(dry_run_report(cfg))
        return 0
    if args.threads is not None and args.threads < 1:
        raise TrainingConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k for k in RESUMABLE_OVERRIDES if getattr(args, k, None) is not None} | {"dp_shard", "ep"}
    explicit = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                if f.name != "out" and getattr(args, f.name, None) is not None}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and cfg.ep == 1 and cfg.dp_shard == 1:
        Trainer(cfg, resume=args.resume, resume_overrides=overrides, explicit=explicit).train()
        return 0

    V.number("--hang-timeout", args.hang_timeout, 0.0, error=TrainingConfigError)
    info = init_distributed(backend="gloo" if cfg.device == "cpu" else None)
    try:
        with fault_guard(info, hang_s=args.hang_timeout):
            Trainer(cfg, resume=args.resume, resume_overrides=overrides, dist=info, explicit=explicit).train()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0

