"""The trainer's checkpoint half: AdamW state by parameter name (EP-independent), the atomic commit of a
complete checkpoint, restoring one, and trimming metrics written after it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointCorruptError, atomic_write, confined, save_pretrained, write_tokenizer_config
from ..checkpoint.io import writing
from ..checkpoint.training_state import (OPTIMIZER_FILE, commit_checkpoint, read_training_tensors, restore_rng_state,
                                         state_path)
from ..data.tokenizer import TOKENIZER_FILE, save_tokenizer
from ..parallel import full_state_dict, gather_named_tensor, shard_named_tensor
from .options import METRICS_FILE


class CheckpointMixin:
    """Checkpoint methods of :class:`moge.train.Trainer` (which holds ``model``, ``optimizer``, ``cfg``,
    ``dist``, ``out``, ``sampler``...)."""

    def _last_saved_step(self) -> int:
        try:
            return int(json.loads(state_path(self.out).read_text())["step"])
        except (OSError, ValueError, KeyError, AttributeError):
            return 0


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

