"""The pieces a training run is built from: model, AdamW, packed data (with its fingerprint), the memory
estimate, and the check of options a ``--resume`` command line gives but the run does not take."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MoGEConfig
from ..data.corpus import DataError, corpus_summary, load_documents, pack_documents, shuffled, split_documents
from ..data.tokenizer import BOS_ID, EOS_ID, encode_batch, train_tokenizer
from .options import TrainConfig


def build_model(model_config: MoGEConfig, seed: int, device: torch.device):
    """A freshly initialised :class:`moge.model.decoder.MoGEForCausalLM` (float32 master weights) on ``device``."""
    from ..model import MoGEForCausalLM

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
    """A lower estimate of one process's training memory: float32 weights, gradients and AdamW's two
    moments (16 bytes a parameter) plus the activations of one micro-batch (logits and their
    gradient, and about 24 values per hidden unit per layer), MTP predictors included."""
    from ..model import count_parameters

    counts = count_parameters(model_config)
    params = counts["total"] + counts["mtp"]
    rows = cfg.batch_size // max(world, 1)
    d = model_config.num_mtp_layers  # each MTP predictor: one more decoder layer and one more logits tensor
    acts = rows * cfg.seq_len * (3 * model_config.vocab_size * (1 + d) + 24 * model_config.hidden_size *
                                 (model_config.num_hidden_layers + d))
    return 16 * params + 4 * acts


def _param_counts(config: MoGEConfig) -> dict[str, int]:
    from ..model import count_parameters

    return count_parameters(config)
