"""The pieces a training run is built from: model, AdamW, packed data (with its fingerprint), the memory
estimate, and the check of options a ``--resume`` command line gives but the run does not take."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MoGEConfig, get_config
from ..data.corpus import DataError, corpus_summary, load_documents, pack_documents, shuffled, split_documents
from ..data.tokenizer import BOS_ID, EOS_ID, encode_batch, train_tokenizer
from ..model import MoGEForCausalLM, count_parameters
from ..parallel.plan import format_plan, memory_plan
from .options import TrainConfig, TrainingConfigError


def build_model(model_config: MoGEConfig, seed: int, device: torch.device):
    """A freshly initialised :class:`moge.model.MoGEForCausalLM` (float32 master weights) on ``device``."""

    torch.manual_seed(seed)
    return MoGEForCausalLM(model_config).to(device)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); weight decay on matrices only (not norms, biases or router scales)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith("router_scale") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the update a plain per-parameter loop: identical on resume and with EP resharding.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


# ---- the trainer -------------------------------------------------------------------------------------

@dataclass
class DataBundle:
    """Packed training rows ``[R, S]`` and validation rows per domain."""
    train_rows: torch.Tensor
    val_rows: dict[str, torch.Tensor]
    summary: dict[str, Any]


def prepare_data(cfg: TrainConfig, tokenizer=None, vocab_size: int = 4096):
    """Load/split the corpus, train (or reuse) the tokenizer on the training split, pack both splits.

    Returns ``(tokenizer, DataBundle)``. Deterministic for a given ``cfg`` (and tokenizer).
    """
    docs = load_documents(cfg.data)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    if tokenizer is None:
        tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size)

    def encode(texts: list[str]) -> list[list[int]]:
        return encode_batch(tokenizer, texts)

    train_rows = pack_documents(shuffled(train_docs, cfg.seed), encode, cfg.seq_len, BOS_ID, EOS_ID)
    val_rows: dict[str, torch.Tensor] = {}
    for domain in sorted({d.domain for d in val_docs}):
        rows = pack_documents([d for d in val_docs if d.domain == domain], encode, cfg.seq_len, BOS_ID, EOS_ID)
        if len(rows):
            val_rows[domain] = rows
    summary = {"train": corpus_summary(train_docs), "val": corpus_summary(val_docs),
               "fingerprint": data_fingerprint(train_rows, val_rows),
               "train_rows": int(train_rows.shape[0]), "val_rows": {k: int(v.shape[0]) for k, v in val_rows.items()},
               "train_tokens": int(train_rows.numel())}
    return tokenizer, DataBundle(train_rows, val_rows, summary)


def data_fingerprint(train_rows: torch.Tensor, val_rows: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the packed training rows and of the validation rows: what a
    resumed run must see again, token for token (the row count alone misses edited text)."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    return {"train": digest([train_rows]), "val": digest(val_rows[k] for k in sorted(val_rows))}


def _check_same_data(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    """:class:`DataError` when the data a run resumes on is not the data it was checkpointed with."""
    old = saved.get("fingerprint") if isinstance(saved, dict) else None
    if not isinstance(old, dict):
        return  # written before fingerprints: only the row count is checked (by the sampler)
    changed = [k for k in ("train", "val") if old.get(k) != now["fingerprint"][k]]
    if changed:
        diff = ", ".join(f"{k} {old.get(k)} -> {now['fingerprint'][k]}" for k in changed)
        raise DataError(f"the {' and '.join(changed)} data changed since the checkpoint in {out} was written "
                        f"(fingerprint {diff}); resume with the same --data files, --seq-len and tokenizer, or "
                        f"start a new run")


def _ignored_flags(explicit: dict[str, Any], saved: "TrainConfig", allowed) -> list[str]:
    """The options given on a ``--resume`` command line that differ from the run's and are not applied."""
    out = []
    for k, v in sorted(explicit.items()):
        if k in allowed or k == "out" or not hasattr(saved, k):
            continue
        if getattr(saved, k) != v:
            out.append(f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})")
    return out


def estimate_training_bytes(model_config: MoGEConfig, cfg: "TrainConfig", world: int = 1) -> int:
    """One rank's training memory from the memory plan (:func:`moge.parallel.plan.memory_plan`): float32
    weight, gradient and AdamW shards at the run's mesh, FSDP2's gathered layers, and the activations
    of one micro-batch, MTP predictors included. ``world`` 1 is one process (nothing sharded)."""
    dp, ep = (cfg.dp_shard, cfg.ep) if world > 1 else (1, 1)
    return memory_plan(model_config, dp, ep, cfg.batch_size, cfg.seq_len, cfg.mixed_precision,
                       cfg.activation_checkpointing).total


def run_config(cfg: "TrainConfig") -> MoGEConfig:
    """The model a fresh run of ``cfg`` trains (the preset with the run's vocabulary, length and MTP)."""
    overrides = {} if cfg.aux_coef is None else {"router_aux_loss_coef": cfg.aux_coef}
    base = get_config(cfg.preset, router=cfg.router, **overrides)
    return base.replace(vocab_size=cfg.vocab_size or base.vocab_size,
                        max_position_embeddings=max(base.max_position_embeddings, cfg.seq_len),
                        num_mtp_layers=cfg.mtp)


def dry_run_report(cfg: "TrainConfig") -> str:
    """``moge train --dry-run``: the per-rank memory plan of ``cfg`` at its mesh, as a Markdown table."""
    cfg.validate()
    model_config = run_config(cfg)
    if model_config.groups % cfg.ep:
        raise TrainingConfigError(f"--ep {cfg.ep} must divide the model's {model_config.groups} expert groups")
    plan = memory_plan(model_config, cfg.dp_shard, cfg.ep, cfg.batch_size, cfg.seq_len, cfg.mixed_precision,
                       cfg.activation_checkpointing)
    world = cfg.dp_shard * cfg.ep
    title = (f"moge train --dry-run: {cfg.preset} on {world} rank(s) (dp_shard {cfg.dp_shard} x ep {cfg.ep}), global "
             f"batch {cfg.batch_size} x {cfg.seq_len} tokens ({cfg.batch_size // world} row(s) per rank), "
             f"mixed precision {cfg.mixed_precision}, activation checkpointing "
             f"{'on' if cfg.activation_checkpointing else 'off'}")
    return format_plan(plan, title)


def _param_counts(config: MoGEConfig) -> dict[str, int]:
    return count_parameters(config)
