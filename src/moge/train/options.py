"""``moge train``'s options: :class:`TrainConfig` (validated, saved with every checkpoint), the command-line
flags, the named errors, the device choice and the learning-rate schedule."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields

import torch

from .. import validate as V
from ..config import ROUTERS
from ..data.corpus import DEFAULT_VAL_FRACTION
from ..errors import MoGEError
from ..parallel.fsdp import MIXED_PRECISION
from .mtp import DEFAULT_MTP_COEF, MAX_MTP


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
    # The mesh (moge.parallel.fsdp): dp_shard x ep = number of torchrun processes. Dense parameters
    # are sharded with FSDP2 over all of them, routed experts by whole groups over ep and with FSDP
    # over dp_shard. --batch-size stays the *global* batch: each rank trains on its own
    # batch_size/(dp_shard*ep) rows of it, so the LM loss and its gradients are the same on any mesh
    # (the balance loss counts experts per rank's rows: see docs/parallel.md).
    dp_shard: int = 1
    ep: int = 1
    mixed_precision: str = "none"  # bf16: FSDP2 computes in bfloat16, reduces gradients in float32
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    # Multi-token prediction: predictors trained beside the main head (moge.train.mtp); a resumed run
    # keeps the checkpoint's. The loss adds mtp_coef * the mean of their losses.
    mtp: int = 0
    mtp_coef: float = DEFAULT_MTP_COEF

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
        V.integer("--mtp", self.mtp, 0, MAX_MTP, error=TrainingConfigError)
        V.number("--mtp-coef", self.mtp_coef, 0.0, error=TrainingConfigError)
        if self.mtp and self.seq_len < self.mtp + 2:
            raise TrainingConfigError(f"--mtp {self.mtp} needs --seq-len >= {self.mtp + 2} (predictor k predicts "
                                      f"the token k+1 ahead of each position), got {self.seq_len}")
        V.integer("--dp-shard", self.dp_shard, 1, error=TrainingConfigError)
        V.integer("--ep", self.ep, 1, error=TrainingConfigError)
        V.choice("--mixed-precision", self.mixed_precision, list(MIXED_PRECISION), error=TrainingConfigError)
        ranks = self.dp_shard * self.ep
        if self.batch_size % ranks:
            raise TrainingConfigError(f"--batch-size {self.batch_size} must be divisible by --dp-shard {self.dp_shard} "
                                      f"x --ep {self.ep} = {ranks} (it is the global batch, split evenly over "
                                      f"the ranks)")


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
                "mixed_precision": (str,), "activation_checkpointing": (bool,),
                **{k: (int,) for k in ("steps", "batch_size", "seq_len", "grad_accum", "warmup", "vocab_size", "seed",
                                       "eval_every", "eval_batches", "log_every", "save_every", "dp_shard", "ep",
                                       "mtp")},
                **{k: (int, float) for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "aux_coef",
                                             "val_fraction", "mtp_coef")}}
_OPTIONAL = {"aux_coef", "vocab_size", "tokenizer"}
# A tokenizer needs its 256 bytes and 3 special tokens; above 2^20 tokens the BPE trainer's tables no
# longer fit a machine's memory (the tokenizers library aborts the process instead of raising).
MIN_VOCAB, MAX_VOCAB = 259, 1 << 20


# Options a resumed run may change; all others are taken from the checkpoint.
RESUMABLE_OVERRIDES = ("dp_shard", "ep", "activation_checkpointing", "steps", "eval_every", "log_every", "save_every", "device", "progress",
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
    p.add_argument("--dp-shard", type=int, default=None, metavar="D",
                   help="FSDP2 shard size; launch with torchrun --nproc-per-node D*E (default 1). Dense parameters "
                        "and optimizer state are sharded over all D*E ranks, routed experts over D")
    p.add_argument("--ep", type=int, default=None, metavar="E",
                   help="expert-parallel size (default 1): routed experts split by whole groups over E ranks with "
                        "MoGE's exact-size dispatch. Multi-process runs save DCP checkpoints, which resume on "
                        "any mesh (moge convert turns them into the released layout)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=None,
                   help="with torchrun: bf16 = FSDP2 computes in bfloat16 and reduces gradients in float32 "
                        "(default none: float32)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each decoder layer in backward instead of keeping its activations")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-rank memory plan (parameters, gradients, optimizer state, activations) "
                        "for the mesh, batch and sequence length, built on the meta device, and exit")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=None, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=None, help=f"gradient-norm clip, 0 = off (default {d.grad_clip})")
    p.add_argument("--aux-coef", type=float, default=None, help="auxiliary balance loss coefficient "
                   "(default: the preset's router_aux_loss_coef)")
    p.add_argument("--mtp", type=int, default=None, metavar="N",
                   help="train N multi-token-prediction predictors (predictor k predicts the token k+1 ahead; "
                        "stored as model.layers.{L+k-1}, used by moge generate --speculative); a resumed run "
                        "keeps the checkpoint's (default 0)")
    p.add_argument("--mtp-coef", type=float, default=None, metavar="C",
                   help=f"weight of the mean MTP loss added to the LM loss (default {DEFAULT_MTP_COEF}, "
                        f"DeepSeek-V3's value for most of its training; it lowers it to 0.1 at the end)")
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

