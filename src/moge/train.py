"""Train a MoGE (or top-K / group-limited baseline) language model on text, with resumable checkpoints.

The output directory is itself a checkpoint in the released layout (``config.json`` + safetensors
weights, loadable by ``moge.checkpoint.load_pretrained`` and transformers' Auto classes) plus
``tokenizer.json`` with the ``generation_config.json`` / ``tokenizer_config.json`` /
``special_tokens_map.json`` that transformers' tools read, the optimizer state
(``optimizer.safetensors``, tensors keyed ``"{param}.exp_avg"`` / ``"{param}.exp_avg_sq"``) and
``moge_training_state.json`` (step, schedule, data position, RNG states, per-file checksums). No
pickle. Checkpoints are committed atomically by :mod:`moge.checkpoint.training_state`.

Metrics go to ``DIR/metrics.jsonl`` (one JSON object per line): ``type: "train"`` lines with the loss,
auxiliary loss, learning rate, tokens/s and, for every layer, the Imbalance Score with devices = groups,
max/mean device load, per-group loads and per-expert counts; ``type: "eval"`` lines with the
validation loss and expert counts per data domain.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import validate as V
from .checkpoint import (CheckpointCorruptError, atomic_write, confined, load_pretrained, save_pretrained,
                         write_tokenizer_config)
from .checkpoint.io import writable_dir, writing
from .checkpoint.lock import DirectoryLock
from .checkpoint.pretrained import refuse_non_finite
from .checkpoint.training_state import (COMMIT_DIR, OPTIMIZER_FILE, commit_checkpoint, has_checkpoint,
                                        read_training_tensors, recover_checkpoint_dir, restore_rng_state, state_path,
                                        verify_checkpoint)
from .config import ROUTERS, MoGEConfig, get_config
from .data import (DEFAULT_VAL_FRACTION, DataError, Document, SequenceSampler, corpus_summary, load_documents,
                   pack_documents, shuffled, split_documents)
from .errors import MoGEError, MoGEWarning
from .validate import check_memory
from .metrics import balance_from_counts
from .parallel import (all_reduce_mean, clip_grad_norm_, full_state_dict, gather_named_tensor, shard_named_tensor,
                       sync_gradients)
from .tokenizer import (BOS_ID, EOS_ID, TOKENIZER_FILE, encode_batch, load_tokenizer, save_tokenizer,
                        train_tokenizer)

METRICS_FILE = "metrics.jsonl"


class TrainingDivergedError(MoGEError):
    """The loss became NaN or infinite; the message names the step. The last good checkpoint is kept."""


class TrainingConfigError(MoGEError, ValueError):
    """Training options that cannot work together; the message names the options."""


# ---- options -------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every training option; saved in ``moge_training_state.json`` so ``--resume`` continues the same run."""
    out: str = "runs/train"
    preset: str = "debug"
    router: str = "moge"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak (paper: 3e-4 -> 3e-5)
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float | None = None  # None: the preset's router_aux_loss_coef
    data: list[str] = field(default_factory=list)  # empty: the built-in corpus
    val_fraction: float = DEFAULT_VAL_FRACTION
    vocab_size: int | None = None  # None: the preset's vocab_size
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    save_every: int = 100
    device: str = "auto"
    compile: bool = False
    progress: bool = True
    # CPU only: deterministic kernels (some backward kernels otherwise sum in thread order), so an
    # interrupted-and-resumed run ends bitwise equal to an uninterrupted one.
    deterministic: bool = True
    # Expert-parallel size = number of torchrun processes. --batch-size stays the *global* batch: each
    # rank trains on its own batch_size/ep rows of it, so the LM loss and its gradients are the same at
    # any --ep (the balance loss counts experts per rank's rows: see docs/parallel.md).
    ep: int = 1

    def validate(self) -> None:
        """Raise :class:`TrainingConfigError` naming the option that is out of range (or of the wrong
        type: a ``train_config`` read back from a hand-edited checkpoint may hold anything)."""
        self._check_types()
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            if int(getattr(self, name)) < 1:
                raise TrainingConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every"):
            if int(getattr(self, name)) < 0:
                raise TrainingConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TrainingConfigError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TrainingConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.router not in ROUTERS:
            raise TrainingConfigError(f"--router must be one of {ROUTERS}, got {self.router!r}")
        V.number("--aux-coef", self.aux_coef, 0.0, optional=True, error=TrainingConfigError)
        V.number("--weight-decay", self.weight_decay, 0.0, error=TrainingConfigError)
        V.number("--grad-clip", self.grad_clip, 0.0, error=TrainingConfigError)
        V.number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, error=TrainingConfigError)
        V.number("val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True, error=TrainingConfigError)
        V.integer("--vocab-size", self.vocab_size, MIN_VOCAB, MAX_VOCAB, optional=True, error=TrainingConfigError)
        V.integer("--seed", self.seed, 0, 2 ** 32 - 1, error=TrainingConfigError)  # numpy's seed range
        if self.ep < 1 or self.batch_size % self.ep:
            raise TrainingConfigError(f"--batch-size {self.batch_size} must be divisible by --ep {self.ep} (it is "
                                      f"the global batch, split evenly over the expert-parallel ranks)")


    def _check_types(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = _FIELD_TYPES.get(f.name)
            ok = want is None or (v is None and f.name in _OPTIONAL) or (
                isinstance(v, want) and not (isinstance(v, bool) and bool not in want))
            if f.name == "data" and ok:
                ok = all(isinstance(x, str) for x in v)
            if not ok:
                kinds = " or ".join(t.__name__ for t in want) + (" or null" if f.name in _OPTIONAL else "")
                raise TrainingConfigError(f"--{f.name.replace('_', '-')} must be {kinds}, got {v!r}")


_FIELD_TYPES = {"out": (str,), "preset": (str,), "router": (str,), "device": (str,), "tokenizer": (str,),
                "data": (list,), "compile": (bool,), "progress": (bool,), "deterministic": (bool,),
                **{k: (int,) for k in ("steps", "batch_size", "seq_len", "grad_accum", "warmup", "vocab_size", "seed",
                                       "eval_every", "eval_batches", "log_every", "save_every", "ep")},
                **{k: (int, float) for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "aux_coef",
                                             "val_fraction")}}
_OPTIONAL = {"aux_coef", "vocab_size", "tokenizer"}
# A tokenizer needs its 256 bytes and 3 special tokens; above 2^20 tokens the BPE trainer's tables no
# longer fit a machine's memory (the tokenizers library aborts the process instead of raising).
MIN_VOCAB, MAX_VOCAB = 259, 1 << 20


# Options a resumed run may change; all others are taken from the checkpoint.
RESUMABLE_OVERRIDES = ("ep", "steps", "eval_every", "log_every", "save_every", "device", "progress",
                       "eval_batches")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``moge train`` options (defaults left as None are filled from :class:`TrainConfig`)."""
    d = TrainConfig()
    p.add_argument("--out", required=True, help="output / checkpoint directory")
    p.add_argument("--preset", default=None, help=f"model size preset (default {d.preset})")
    p.add_argument("--router", choices=ROUTERS, default=None, help=f"routing rule (default {d.router})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps in total (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per micro-batch (default {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel size; launch with torchrun --nproc-per-node EP (default 1). Routed "
                        "experts are sharded by whole groups, everything else is data parallel; checkpoints "
                        "are the same whatever EP, so a run may resume at another EP size")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=None, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=None, help=f"gradient-norm clip, 0 = off (default {d.grad_clip})")
    p.add_argument("--aux-coef", type=float, default=None, help="auxiliary balance loss coefficient "
                   "(default: the preset's router_aux_loss_coef)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files, directories, .jsonl ('text' field) or .parquet ('text' column); "
                        "default: the built-in code/prose/math corpus")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between validations, 0 = only at the end "
                   f"(default {d.eval_every})")
    p.add_argument("--eval-batches", type=int, default=None, help=f"validation batches per domain (default {d.eval_batches})")
    p.add_argument("--log-every", type=int, default=None, help=f"steps between metrics lines (default {d.log_every})")
    p.add_argument("--save-every", type=int, default=None, help=f"steps between checkpoints, 0 = only at the end "
                   f"(default {d.save_every})")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--hang-timeout", type=float, default=30.0,
                   help="with --ep: seconds without progress after which a rank that the others wait for is "
                        "named as hung and the run stops (default 30; 0 = off; the collective timeout is 120)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed CLI arguments (unset options keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    return TrainConfig(**given)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``moge train``."""
    cfg = config_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise TrainingConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k for k in RESUMABLE_OVERRIDES if getattr(args, k, None) is not None} | {"ep"}
    explicit = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                if f.name != "out" and getattr(args, f.name, None) is not None}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and cfg.ep == 1:
        Trainer(cfg, resume=args.resume, resume_overrides=overrides, explicit=explicit).train()
        return 0
    from .parallel import fault_guard, init_distributed

    V.number("--hang-timeout", args.hang_timeout, 0.0, error=TrainingConfigError)
    info = init_distributed(backend="gloo" if cfg.device == "cpu" else None)
    try:
        with fault_guard(info, hang_s=args.hang_timeout):
            Trainer(cfg, resume=args.resume, resume_overrides=overrides, dist=info, explicit=explicit).train()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


# ---- small pieces ----------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA request without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingConfigError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingConfigError(f"--device {name} requested but CUDA is not available")
    return dev


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, then cosine decay to ``min_ratio * peak``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(model_config: MoGEConfig, seed: int, device: torch.device):
    """A freshly initialised :class:`moge.model.MoGEForCausalLM` (float32 master weights) on ``device``."""
    from .model import MoGEForCausalLM

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
    gradient, and about 24 values per hidden unit per layer)."""
    from .model import count_parameters

    params = count_parameters(model_config)["total"]
    rows = cfg.batch_size // max(world, 1)
    acts = rows * cfg.seq_len * (3 * model_config.vocab_size + 24 * model_config.hidden_size *
                                 model_config.num_hidden_layers)
    return 16 * params + 4 * acts


class Trainer:
    """One training run in ``cfg.out``: data, tokenizer, model, AdamW, schedule, metrics and checkpoints.

    The pieces are small methods (:meth:`train_step`, :meth:`evaluate`, :meth:`save_checkpoint`,
    :meth:`load_checkpoint`) so wrappers such as expert parallelism can reuse them.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, resume_overrides: set[str] | None = None,
                 tokenizer=None, bar_position: int = 0, dist=None, explicit: dict[str, Any] | None = None):
        from .parallel import DistInfo

        self.bar_position = bar_position
        self.out = Path(cfg.out)
        self._lock = DirectoryLock(self.out)
        # Expert parallelism: rank / world / group / device of this process (one process: world 1).
        self.dist = dist if dist is not None else DistInfo(0, 1, 0, None, torch.device("cpu"))
        try:
            self._setup(cfg, resume, resume_overrides, tokenizer, explicit or {})
        except BaseException:
            self._lock.release()
            raise

    def _take_directory(self, resume: bool) -> None:
        """Refuse an --out that is a file, create it, and take its lock (rank 0: the one writer)."""
        if self.out.exists() and not self.out.is_dir():
            raise TrainingConfigError(f"--out {self.out} exists and is not a directory; choose a directory")
        if resume and not self.out.is_dir():
            raise TrainingConfigError(f"--resume: {self.out} does not exist (nothing to resume)")
        if not self.dist.is_main:
            return
        writable_dir(self.out, "training output directory")
        self._lock.acquire()
        note = self._lock.stale_note()
        if note:
            print(f"moge train: {note}", file=sys.stderr)

    def _setup(self, cfg: TrainConfig, resume: bool, resume_overrides: set[str] | None, tokenizer,
               explicit: dict[str, Any]) -> None:
        if not resume:
            cfg.validate()  # before anything is created
            get_config(cfg.preset, router=cfg.router)
        self._take_directory(resume)
        if resume:
            if self.dist.is_main:  # the others wait: one process repairs the directory
                recover_checkpoint_dir(self.out)
            self._barrier()
            state = verify_checkpoint(self.out)
            known = {f.name for f in fields(TrainConfig)}
            try:
                saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in known})
                saved.validate()
            except (TrainingConfigError, TypeError) as e:
                raise CheckpointCorruptError(f"{state_path(self.out)}: its train_config is invalid: {e}") from None
            allowed = resume_overrides if resume_overrides is not None else RESUMABLE_OVERRIDES
            ignored = _ignored_flags(explicit, saved, allowed)
            if ignored and self.dist.is_main:
                warnings.warn(f"--resume continues the run in {self.out} with its own options; ignored: "
                              f"{', '.join(ignored)}. A resumed run may change only "
                              f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OVERRIDES)}",
                              MoGEWarning, stacklevel=3)
            for k in allowed:
                setattr(saved, k, getattr(cfg, k))
            saved.out = cfg.out
            cfg = saved
        elif has_checkpoint(self.out):
            raise TrainingConfigError(f"{self.out} already holds a training checkpoint; pass --resume to continue "
                                      f"it or choose another --out")
        elif self.dist.is_main:
            # A fresh run owns the directory: metrics of a run killed before its first checkpoint go.
            stale = self._metrics_path()
            if stale.is_file():
                stale.unlink()
        cfg.validate()
        if cfg.ep != self.dist.world_size:
            raise TrainingConfigError(f"--ep {cfg.ep} but {self.dist.world_size} process(es) were launched; use "
                                      f"torchrun --nproc-per-node {cfg.ep} ... --ep {cfg.ep}")
        self.cfg = cfg
        self.device = self.dist.device if self.dist.world_size > 1 else resolve_device(cfg.device)
        overrides = {} if cfg.aux_coef is None else {"router_aux_loss_coef": cfg.aux_coef}
        base = get_config(cfg.preset, router=cfg.router, **overrides)  # bad presets fail before any write
        if resume:
            tokenizer = load_tokenizer(confined(self.out, TOKENIZER_FILE))
        elif tokenizer is None and cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer)
        vocab = cfg.vocab_size or base.vocab_size
        if self.dist.world_size > 1 and tokenizer is None:
            # One tokenizer for all ranks: rank 0 trains it, the others load its file.
            shared = self.out / ".ep-tokenizer.json"
            if self.dist.is_main:
                with self.dist.busy("training the tokenizer"):  # the others wait at the barrier
                    self.tokenizer, self.data = prepare_data(cfg, None, vocab)
                    self.out.mkdir(parents=True, exist_ok=True)
                    save_tokenizer(self.tokenizer, shared)
            self._barrier()
            if not self.dist.is_main:
                with self.dist.busy("preparing the data"):
                    self.tokenizer, self.data = prepare_data(cfg, load_tokenizer(shared), vocab)
            self._barrier()
            if self.dist.is_main:
                shared.unlink()
        else:
            self.tokenizer, self.data = prepare_data(cfg, tokenizer, vocab)
        if resume:
            _check_same_data(state.get("data"), self.data.summary, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_config = base.replace(vocab_size=self.tokenizer.get_vocab_size(),
                                         max_position_embeddings=max(base.max_position_embeddings, cfg.seq_len))
        check_memory(estimate_training_bytes(self.model_config, cfg, self.dist.world_size),
                     f"training {cfg.preset} with --batch-size {cfg.batch_size} --seq-len {cfg.seq_len} "
                     f"(vocabulary {self.model_config.vocab_size})", self.device)
        if resume:
            # verify_checkpoint has hashed every file; here only NaN/inf weights remain to refuse.
            self.model = load_pretrained(self.out, dtype=torch.float32, device=str(self.device), verify=False)
            for name, p in self.model.named_parameters():
                refuse_non_finite(name, p.detach(), str(self.out))
            self.model_config = self.model.config
        else:
            self.model = build_model(self.model_config, cfg.seed, self.device)
        if self.dist.world_size > 1:
            from .parallel import apply_expert_parallel, check_config_consistent

            check_config_consistent({"train": asdict(cfg), "model": self.model_config.to_dict(),
                                     "tokenizer": hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest(),
                                     "data": self.data.summary}, self.dist.group)
            # Same seed / same checkpoint on every rank; each keeps its block of expert groups.
            self.model = apply_expert_parallel(self.model, self.dist.group)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sampler = SequenceSampler(self.data.train_rows.shape[0], cfg.seed)
        self.step = 0
        self.tokens_seen = 0
        self._forward = torch.compile(self.model) if cfg.compile else self.model
        if resume:
            self.load_checkpoint(state)
        else:
            torch.manual_seed(cfg.seed + 1)  # the training RNG stream, independent of init
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)

    # -- schedule and steps --------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, c.lr, c.warmup, c.steps, c.min_lr_ratio)

    @contextlib.contextmanager
    def _determinism(self):
        """Deterministic kernels for the duration of a step (CPU), restoring the caller's setting."""
        if not (self.cfg.deterministic and self.device.type == "cpu"):
            yield
            return
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; raises on a non-finite loss."""
        with self._determinism():
            return self._train_step()

    def _train_step(self) -> dict[str, Any]:
        c = self.cfg
        self.model.train()
        lr = self.lr(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        counts: list[torch.Tensor | None] | None = None
        balance: list[torch.Tensor] = []  # per micro-batch [L_moe, 2]
        for _ in range(c.grad_accum):
            idx = self.sampler.next_indices(c.batch_size)
            per_rank = c.batch_size // self.dist.world_size
            idx = idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]  # this rank's slice
            x_BS = self.data.train_rows[idx].to(self.device, non_blocking=True)
            with self._autocast():
                out = self._forward(x_BS, labels=x_BS)
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=self.device)
            ((out.loss + aux) / c.grad_accum).backward()
            loss_sum += out.loss.detach().float()
            aux_sum += aux.detach().float()
            step_counts = [None if st is None else st.expert_counts.detach() for st in out.router_stats]
            counts = step_counts if counts is None else [None if a is None else a + b for a, b in zip(counts, step_counts)]
            rows = [balance_from_counts(st.expert_counts, self.model_config.groups, st.num_tokens)
                    for st in out.router_stats if st is not None]
            if rows:
                balance.append(torch.stack(rows))
        sync_gradients(self.model, self.dist.group)  # data-parallel mean; expert shards scaled
        loss_sum = all_reduce_mean(loss_sum, self.dist.group)  # the global batch's loss, same on every rank
        aux_sum = all_reduce_mean(aux_sum, self.dist.group)
        loss, aux_loss = float(loss_sum) / c.grad_accum, float(aux_sum) / c.grad_accum
        if not (math.isfinite(loss) and math.isfinite(aux_loss)):
            self._diverged(f"training loss is {loss} (auxiliary loss {aux_loss})")
        grad_norm = clip_grad_norm_(self.model, c.grad_clip if c.grad_clip > 0 else float("inf"), self.dist.group)
        if not math.isfinite(float(grad_norm)):
            self._diverged(f"gradient norm is {float(grad_norm)} (loss {loss})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += c.grad_accum * c.batch_size * c.seq_len
        bal = torch.stack(balance).cpu() if balance else None  # [micro, L_moe, 2]
        return {"loss": loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": float(grad_norm),
                "counts": [None if t is None else t.cpu() for t in counts], "balance": bal}

    def _diverged(self, what: str) -> None:
        """Drop this step's gradients and raise :class:`TrainingDivergedError` naming the step."""
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(
            f"{what} at step {self.step + 1}; stopped before updating the weights. The last good checkpoint "
            f"in {self.out} (step {self._last_saved_step()}) is kept; try a lower --lr or more --warmup")

    def _last_saved_step(self) -> int:
        try:
            return int(json.loads(state_path(self.out).read_text())["step"])
        except (OSError, ValueError, KeyError, AttributeError):
            return 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss per domain on the first ``eval_batches`` batches, and expert counts per domain."""
        c = self.cfg
        self.model.eval()
        losses, counts = {}, {}
        for domain, rows in self.data.val_rows.items():
            total, n_tok = 0.0, 0
            layer_counts: list[torch.Tensor | None] | None = None
            for b in range(min(c.eval_batches, math.ceil(rows.shape[0] / c.batch_size))):
                x_BS = rows[b * c.batch_size:(b + 1) * c.batch_size].to(self.device)
                with self._autocast():
                    out = self._forward(x_BS, labels=x_BS)
                n = x_BS.shape[0] * (x_BS.shape[1] - 1)
                total += float(out.loss) * n
                n_tok += n
                sc = [None if st is None else st.expert_counts for st in out.router_stats]
                layer_counts = sc if layer_counts is None else [None if a is None else a + b2
                                                                for a, b2 in zip(layer_counts, sc)]
            losses[domain] = total / max(n_tok, 1)
            counts[domain] = [None if t is None else t.cpu().tolist() for t in (layer_counts or [])]
        self.model.train()
        mean = sum(losses.values()) / len(losses) if losses else float("nan")
        return {"val_loss": losses, "val_loss_mean": mean, "expert_counts": counts}

    # -- checkpoints ---------------------------------------------------------------------------------
    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """AdamW moments keyed ``"{param}.exp_avg"`` / ``"{param}.exp_avg_sq"``, and step counts by name."""
        tensors, steps = {}, {}
        for name, p in self.model.named_parameters():
            st = self.optimizer.state.get(p)
            if not st:
                continue
            for key in ("exp_avg", "exp_avg_sq"):  # expert shards are gathered: the file is EP-independent
                full = gather_named_tensor(name, st[key].detach(), self.dist.group)
                tensors[f"{name}.{key}"] = full.contiguous().cpu()
            steps[name] = float(st["step"])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return tensors, {"step": steps, "param_groups": groups}

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`optimizer_state` (matching by parameter name, so layouts may be resharded)."""
        rank, world = self.dist.rank, self.dist.world_size
        for name, p in self.model.named_parameters():
            if name not in meta["step"]:
                continue
            try:
                exp_avg, exp_avg_sq = tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"]
            except KeyError as e:
                raise CheckpointCorruptError(f"{self.out / OPTIMIZER_FILE} lacks tensor {e}") from None
            exp_avg, exp_avg_sq = (shard_named_tensor(name, t, rank, world) for t in (exp_avg, exp_avg_sq))
            for key, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if t.shape != p.shape or not t.is_floating_point():
                    raise CheckpointCorruptError(f"{self.out / OPTIMIZER_FILE}: {name}.{key} has shape "
                                                 f"{tuple(t.shape)} {t.dtype}, the parameter {tuple(p.shape)}")
            self.optimizer.state[p] = {
                "step": torch.tensor(meta["step"][name], dtype=torch.float32),
                "exp_avg": exp_avg.to(p.device, p.dtype), "exp_avg_sq": exp_avg_sq.to(p.device, p.dtype)}
        for g, saved in zip(self.optimizer.param_groups, meta["param_groups"]):
            g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})

    def save_checkpoint(self) -> None:
        """Write a complete checkpoint atomically (see :func:`moge.checkpoint.training_state.commit_checkpoint`)."""
        from safetensors.torch import save_file

        # Collectives under EP: every rank takes part before the rank-0 branch.
        full_sd = full_state_dict(self.model, self.dist.group) if self.dist.world_size > 1 else None
        opt_tensors, opt_meta = self.optimizer_state()
        if self.dist.is_main:
            self._lock.acquire()

            def write_files(staging: Path) -> None:
                sd = full_sd if full_sd is not None else self.model.state_dict()
                save_pretrained(staging, self.model_config, sd)  # the same files at any EP size
                save_tokenizer(self.tokenizer, staging / TOKENIZER_FILE)
                write_tokenizer_config(staging, self.model_config)  # what transformers' AutoTokenizer reads
                save_file(opt_tensors, str(staging / OPTIMIZER_FILE), metadata={"format": "pt"})

            state = {"step": self.step, "tokens_seen": self.tokens_seen,
                     "train_config": asdict(self.cfg), "model_config": self.model_config.to_dict(),
                     "scheduler": {"kind": "warmup_cosine", "peak_lr": self.cfg.lr, "warmup": self.cfg.warmup,
                                   "total_steps": self.cfg.steps, "min_lr_ratio": self.cfg.min_lr_ratio,
                                   "last_lr": self.lr(max(self.step - 1, 0))},
                     "sampler": self.sampler.state_dict(), "optimizer": opt_meta, "data": self.data.summary}
            with self.dist.busy("writing a checkpoint"):  # the others wait at the barrier
                commit_checkpoint(self.out, write_files, state)
        self._barrier()

    def _barrier(self) -> None:
        """Wait for every expert-parallel rank (no-op for one process)."""
        if self.dist.world_size > 1:
            torch.distributed.barrier(self.dist.group)

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Restore optimizer, schedule position, data position and RNGs from a verified checkpoint."""
        optimizer_tensors, rng_tensors = read_training_tensors(self.out)
        self.load_optimizer_state(optimizer_tensors, state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        try:
            restore_rng_state(rng_tensors, state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointCorruptError(f"{state_path(self.out)}: the saved RNG state cannot be restored "
                                         f"({type(e).__name__}: {e})") from None
        if self.dist.is_main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics lines written after the checkpoint (they will be produced again)."""
        path = self._metrics_path()
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut off by the interruption
        text = "".join(s + "\n" for s in keep)
        with writing("metrics", path):
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def _metrics_path(self) -> Path:
        """``DIR/metrics.jsonl``, refused if it is a link that leads out of the directory."""
        return confined(self.out, METRICS_FILE)

    # -- the loop ------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:  # one metrics file, written by rank 0
            return
        self._lock.acquire()  # no-op while held; again after train() returned
        path = self._metrics_path()
        with writing("metrics", path), path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Release the output directory's lock (``train`` does when it returns or raises)."""
        self._lock.release()

    def _layer_records(self, counts, balances: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Per-layer metrics over the logging interval (IS mean and max, max/mean load) and last step counts."""
        bal = torch.cat(balances)  # [micro-batches, L_moe, 2]
        out, j = [], 0
        for i, cnt in enumerate(counts):
            if cnt is None:
                out.append({"layer": i, "dense": True})
                continue
            m = self.model_config.groups
            out.append({"layer": i, "imbalance_score": float(bal[:, j, 0].mean()),
                        "imbalance_score_max": float(bal[:, j, 0].max()),
                        "max_mean_load": float(bal[:, j, 1].mean()),
                        "max_mean_load_max": float(bal[:, j, 1].max()),
                        "group_loads": cnt.view(m, -1).sum(-1).tolist(), "expert_counts": cnt.tolist()})
            j += 1
        return out

    def train(self) -> dict[str, Any]:
        """Run until ``cfg.steps``; log, evaluate and checkpoint on schedule. Returns the final evaluation."""
        from tqdm.auto import tqdm

        c = self.cfg
        if self.step >= c.steps and self.dist.is_main:
            print(f"{self.out}: already trained to step {self.step} of --steps {c.steps}; raise --steps to "
                  f"continue", flush=True)
        if self.step == 0:
            self._log({"type": "start", "step": 0, "model_config": self.model_config.to_dict(),
                       "train_config": asdict(c), "data": self.data.summary,
                       "parameters": _param_counts(self.model_config)})
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress or not self.dist.is_main,
                   desc=f"train {c.router}", unit="step", dynamic_ncols=True, position=self.bar_position,
                   mininterval=1.0)
        interval_loss, interval_aux, balances, interval_time, interval_tokens = [], [], [], 0.0, 0
        last_eval: dict[str, Any] | None = None
        start = time.perf_counter()
        try:
            while self.step < c.steps:
                t0 = time.perf_counter()
                r = self.train_step()
                dt = time.perf_counter() - t0
                interval_time += dt
                interval_tokens += c.grad_accum * c.batch_size * c.seq_len
                interval_loss.append(r["loss"])
                interval_aux.append(r["aux_loss"])
                if r["balance"] is not None:
                    balances.append(r["balance"])
                bar.update(1)
                bar.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{interval_tokens / max(interval_time, 1e-9):.0f}")
                if self.step % c.log_every == 0 or self.step == c.steps:
                    self._log({"type": "train", "step": self.step, "loss": sum(interval_loss) / len(interval_loss),
                               "last_loss": r["loss"], "aux_loss": sum(interval_aux) / len(interval_aux),
                               "lr": r["lr"], "grad_norm": r["grad_norm"],
                               "tokens_per_s": interval_tokens / max(interval_time, 1e-9),
                               "tokens": self.tokens_seen, "elapsed_s": time.perf_counter() - start,
                               "layers": self._layer_records(r["counts"], balances) if balances else []})
                    interval_loss, interval_aux, balances, interval_time, interval_tokens = [], [], [], 0.0, 0
                if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps:
                    last_eval = self.evaluate()
                    self._log({"type": "eval", "step": self.step, **last_eval})
                    if self.dist.is_main:
                        bar.write(f"{c.router} step {self.step}: val loss " + ", ".join(
                            f"{k} {v:.3f}" for k, v in last_eval["val_loss"].items()))
                if (c.save_every and self.step % c.save_every == 0) or self.step == c.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.close()
        return last_eval or {}


def _param_counts(config: MoGEConfig) -> dict[str, int]:
    from .model import count_parameters

    return count_parameters(config)
