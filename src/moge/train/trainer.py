"""The :class:`Trainer`: one training run in ``cfg.out`` (setup, steps, evaluation, metrics, the loop);
its checkpoint methods are in :mod:`moge.train.checkpointing`, MTP bookkeeping in :mod:`moge.train.mtp`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointCorruptError, confined, load_pretrained, read_config
from ..checkpoint.io import writable_dir, writing
from ..checkpoint.lock import DirectoryLock
from ..checkpoint.reading import refuse_non_finite
from ..checkpoint.training_state import (FORMAT_DCP, has_checkpoint, recover_checkpoint_dir, state_path,
                                         verify_checkpoint)
from ..config import get_config
from ..data.corpus import SequenceSampler
from ..data.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer
from ..errors import MoGEWarning
from ..metrics import balance_from_counts
from ..parallel import (DistInfo, MeshError, MeshShape, all_reduce_mean, build_mesh, check_config_consistent,
                        clip_grad_norm_, shard_model)
from ..progress import progress
from ..validate import check_memory
from .checkpointing import CheckpointMixin
from .mtp import MTPEval, MTPInterval, MTPStep, layer_records, mtp_loss_term
from .options import RESUMABLE_OVERRIDES, TrainConfig, TrainingConfigError, TrainingDivergedError, lr_at, resolve_device
from .setup import (_check_same_data, _ignored_flags, _param_counts, build_model, build_optimizer,
                    estimate_training_bytes, prepare_data)


class Trainer(CheckpointMixin):
    """One training run in ``cfg.out``: data, tokenizer, model, AdamW, schedule, metrics and checkpoints.

    The pieces are small methods (:meth:`train_step`, :meth:`evaluate`, :meth:`save_checkpoint`,
    :meth:`load_checkpoint`) so wrappers such as expert parallelism can reuse them.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, resume_overrides: set[str] | None = None,
                 tokenizer=None, bar_position: int = 0, dist=None, explicit: dict[str, Any] | None = None):
        self.bar_position = bar_position
        self.out = Path(cfg.out).expanduser()
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
        state: dict[str, Any] = {}
        if resume:
            cfg, state = self._resumed_config(cfg, resume_overrides, explicit)
        elif has_checkpoint(self.out):
            raise TrainingConfigError(f"{self.out} already holds a training checkpoint; pass --resume to continue "
                                      f"it or choose another --out")
        elif self.dist.is_main:
            # A fresh run owns the directory: metrics of a run killed before its first checkpoint go.
            stale = self._metrics_path()
            if stale.is_file():
                stale.unlink()
        cfg.validate()
        self.cfg = cfg
        self.dcp = state.get("format") == FORMAT_DCP  # weights and moments to read from DCP
        self.device = self.dist.device if self.dist.world_size > 1 else resolve_device(cfg.device)
        overrides = {} if cfg.aux_coef is None else {"router_aux_loss_coef": cfg.aux_coef}
        base = get_config(cfg.preset, router=cfg.router, **overrides)  # bad presets fail before any write
        try:
            MeshShape(cfg.dp_shard, cfg.ep).check(self.dist.world_size, base.groups)
        except MeshError as e:
            raise TrainingConfigError(str(e)) from None
        if resume:
            tokenizer = load_tokenizer(confined(self.out, TOKENIZER_FILE))
        elif tokenizer is None and cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer)
        self._prepare_data(cfg, tokenizer, cfg.vocab_size or base.vocab_size)
        if resume:
            _check_same_data(state.get("data"), self.data.summary, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_config = base.replace(vocab_size=self.tokenizer.get_vocab_size(),
                                         max_position_embeddings=max(base.max_position_embeddings, cfg.seq_len),
                                         num_mtp_layers=cfg.mtp)
        check_memory(estimate_training_bytes(self.model_config, cfg, self.dist.world_size),
                     f"training {cfg.preset} with --batch-size {cfg.batch_size} --seq-len {cfg.seq_len} "
                     f"(vocabulary {self.model_config.vocab_size})", self.device)
        self._build_model(cfg, resume)
        self._place_model(cfg)
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

    def _resumed_config(self, cfg: TrainConfig, resume_overrides: set[str] | None,
                        explicit: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
        """The saved run's options (with the flags a resumed run may change taken from ``cfg``) and its
        verified training state; ignored flags are named in a warning."""
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
                          MoGEWarning, stacklevel=4)
        for k in allowed:
            setattr(saved, k, getattr(cfg, k))
        saved.out = cfg.out
        return saved, state

    def _prepare_data(self, cfg: TrainConfig, tokenizer, vocab: int) -> None:
        """``self.tokenizer`` and ``self.data``; with several ranks and no tokenizer given, rank 0 trains
        one and the others load its file, so every rank has the same tokenizer."""
        if self.dist.world_size == 1 or tokenizer is not None:
            self.tokenizer, self.data = prepare_data(cfg, tokenizer, vocab)
            return
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

    def _place_model(self, cfg: TrainConfig) -> None:
        """One process: activation checkpointing as asked. Several: check that every rank has the same
        run, then shard the model over the (dp_shard, ep) mesh (same seed everywhere; each rank keeps
        its shards, which a DCP resume then overwrites)."""
        if self.dist.world_size == 1:
            self.model.model.gradient_checkpointing = cfg.activation_checkpointing
            return
        check_config_consistent({"train": asdict(cfg), "model": self.model_config.to_dict(),
                                 "tokenizer": hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest(),
                                 "data": self.data.summary}, self.dist.group)
        mesh = build_mesh(MeshShape(cfg.dp_shard, cfg.ep), self.device.type)
        # Logged in the start line: every MoGE layer, the MTP predictors' included, must be here.
        self.sharded_layers = shard_model(self.model, mesh, cfg.mixed_precision,
                                          activation_checkpointing=cfg.activation_checkpointing)

    def _build_model(self, cfg: TrainConfig, resume: bool) -> None:
        """The model every rank starts from: fresh (seeded), a DCP run's (seeded, its weights are read
        after sharding) or a single-process run's released-layout weights (one process only)."""
        if resume and not self.dcp:
            if self.dist.world_size > 1:
                raise TrainingConfigError(
                    f"{self.out} was written by a single-process run (released layout); multi-process runs resume "
                    f"DCP checkpoints. Resume it on one process, or start from its weights in a new run")
            # verify_checkpoint has hashed every file; here only NaN/inf weights remain to refuse.
            self.model = load_pretrained(self.out, dtype=torch.float32, device=str(self.device), verify=False)
            for name, p in self.model.named_parameters():
                refuse_non_finite(name, p.detach(), str(self.out))
            self.model_config = self.model.config
        else:
            if resume:
                self.model_config = read_config(self.out)
            self.model = build_model(self.model_config, cfg.seed, self.device)
        if resume and self.model_config.num_mtp_layers != cfg.mtp:  # the run's options and its weights disagree
            raise CheckpointCorruptError(
                f"{self.out}: config.json has num_mtp_layers={self.model_config.num_mtp_layers} but "
                f"{state_path(self.out).name} says the run trains --mtp {cfg.mtp}")

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
        mtp = MTPStep(self.model_config.groups)
        for _ in range(c.grad_accum):
            idx = self.sampler.next_indices(c.batch_size)
            per_rank = c.batch_size // self.dist.world_size
            idx = idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]  # this rank's slice
            x_BS = self.data.train_rows[idx].to(self.device, non_blocking=True)
            with self._autocast():
                out = self._forward(x_BS, labels=x_BS)
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=self.device)
            mtp_term = mtp_loss_term(out.mtp, c.mtp_coef, out.loss)
            ((out.loss + mtp_term + aux) / c.grad_accum).backward()
            mtp.add(out.mtp)
            loss_sum += out.loss.detach().float()
            aux_sum += aux.detach().float()
            step_counts = [None if st is None else st.expert_counts.detach() for st in out.router_stats]
            counts = step_counts if counts is None else [None if a is None else a + b for a, b in zip(counts, step_counts)]
            rows = [balance_from_counts(st.expert_counts, self.model_config.groups, st.num_tokens)
                    for st in out.router_stats if st is not None]
            if rows:
                balance.append(torch.stack(rows))
        loss_sum = all_reduce_mean(loss_sum, self.dist.group)  # the global batch's loss, same on every rank
        aux_sum = all_reduce_mean(aux_sum, self.dist.group)
        loss, aux_loss = float(loss_sum) / c.grad_accum, float(aux_sum) / c.grad_accum
        mtp_r = mtp.result(self.dist.group)
        if not (math.isfinite(loss) and math.isfinite(aux_loss) and all(map(math.isfinite, mtp_r["mtp_loss"]))):
            self._diverged(f"training loss is {loss} (auxiliary loss {aux_loss}"
                           + (f", MTP losses {mtp_r['mtp_loss']})" if mtp_r["mtp_loss"] else ")"))
        # FSDP2 averaged the gradients in backward; the norm is the unsharded model's.
        grad_norm = clip_grad_norm_(self.model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
        if not math.isfinite(float(grad_norm)):
            self._diverged(f"gradient norm is {float(grad_norm)} (loss {loss})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += c.grad_accum * c.batch_size * c.seq_len
        bal = torch.stack(balance).cpu() if balance else None  # [micro, L_moe, 2]
        return {"loss": loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": float(grad_norm),
                "counts": [None if t is None else t.cpu() for t in counts], "balance": bal, **mtp_r}

    def _diverged(self, what: str) -> None:
        """Drop this step's gradients and raise :class:`TrainingDivergedError` naming the step."""
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(
            f"{what} at step {self.step + 1}; stopped before updating the weights. The last good checkpoint "
            f"in {self.out} (step {self._last_saved_step()}) is kept; try a lower --lr or more --warmup")


    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss per domain on the first ``eval_batches`` batches, and expert counts per domain."""
        c = self.cfg
        self.model.eval()
        losses, counts = {}, {}
        mtp = MTPEval()
        for domain, rows in self.data.val_rows.items():
            total, n_tok = 0.0, 0
            layer_counts: list[torch.Tensor | None] | None = None
            for b in range(min(c.eval_batches, math.ceil(rows.shape[0] / c.batch_size))):
                x_BS = rows[b * c.batch_size:(b + 1) * c.batch_size].to(self.device)
                with self._autocast():
                    out = self._forward(x_BS, labels=x_BS)
                n = x_BS.shape[0] * (x_BS.shape[1] - 1)
                total += float(out.loss) * n
                mtp.add(domain, out.mtp, x_BS.shape[0], x_BS.shape[1])
                n_tok += n
                sc = [None if st is None else st.expert_counts for st in out.router_stats]
                layer_counts = sc if layer_counts is None else [None if a is None else a + b2
                                                                for a, b2 in zip(layer_counts, sc)]
            losses[domain] = total / max(n_tok, 1)
            counts[domain] = [None if t is None else t.cpu().tolist() for t in (layer_counts or [])]
        self.model.train()
        mean = sum(losses.values()) / len(losses) if losses else float("nan")
        return {"val_loss": losses, "val_loss_mean": mean, "expert_counts": counts, **mtp.record()}

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
        return layer_records(counts, torch.cat(balances), self.model_config.groups)  # [micro, L_moe, 2]

    def train(self) -> dict[str, Any]:
        """Run until ``cfg.steps``; log, evaluate and checkpoint on schedule. Returns the final evaluation."""
        c = self.cfg
        if self.step >= c.steps and self.dist.is_main:
            print(f"{self.out}: already trained to step {self.step} of --steps {c.steps}; raise --steps to "
                  f"continue", flush=True)
        if self.step == 0:
            self._log({"type": "start", "step": 0, "model_config": self.model_config.to_dict(),
                       "train_config": asdict(c), "data": self.data.summary,
                       "parameters": _param_counts(self.model_config),
                       **({"mesh": {"dp_shard": c.dp_shard, "ep": c.ep, "sharded_layers": self.sharded_layers}}
                          if self.dist.world_size > 1 else {})})
        bar = progress(c.steps, f"train {c.router}", "step", initial=self.step, position=self.bar_position,
                       disable=not c.progress or not self.dist.is_main, mininterval=1.0)
        interval_loss, interval_aux, balances, interval_time, interval_tokens = [], [], [], 0.0, 0
        mtp = MTPInterval(self.model_config.num_hidden_layers, self.model_config.groups)
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
                mtp.add(r)
                bar.update(1)
                # MTP: each predictor's loss / top-1 accuracy of this step, e.g. mtp=2.851/0.41
                shown = {"mtp": " ".join(f"{a:.3f}/{b:.2f}" for a, b in zip(r["mtp_loss"], r["mtp_accuracy"]))
                         } if r["mtp_loss"] else {}
                bar.set_postfix(loss=f"{r['loss']:.3f}", **shown,
                                tok_s=f"{interval_tokens / max(interval_time, 1e-9):.0f}")
                if self.step % c.log_every == 0 or self.step == c.steps:
                    self._log({"type": "train", "step": self.step, "loss": sum(interval_loss) / len(interval_loss),
                               "last_loss": r["loss"], "aux_loss": sum(interval_aux) / len(interval_aux),
                               "lr": r["lr"], "grad_norm": r["grad_norm"],
                               "tokens_per_s": interval_tokens / max(interval_time, 1e-9),
                               "tokens": self.tokens_seen, "elapsed_s": time.perf_counter() - start,
                               "layers": self._layer_records(r["counts"], balances) if balances else [],
                               **mtp.record(r)})
                    interval_loss, interval_aux, balances, interval_time, interval_tokens = [], [], [], 0.0, 0
                    mtp.reset()
                if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps:
                    last_eval = self.evaluate()
                    self._log({"type": "eval", "step": self.step, **last_eval})
                    if self.dist.is_main:
                        bar.write(f"{c.router} step {self.step}: val loss " + ", ".join(
                            f"{k} {v:.3f}" for k, v in last_eval["val_loss"].items()) + "".join(
                            f"; MTP {p['predictor']} val loss {p['val_loss_mean']:.3f} top-1 {p['val_accuracy_mean']:.3f}"
                            for p in last_eval.get("mtp", [])))
                if (c.save_every and self.step % c.save_every == 0) or self.step == c.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.close()
        return last_eval or {}

