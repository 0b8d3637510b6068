"""The trainer's checkpoint half: AdamW state by parameter name, the atomic commit of a complete
checkpoint (released layout on one process, DCP shards from every rank of a multi-process run),
restoring one on any mesh, and trimming metrics written after it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..checkpoint import (CONFIG_NAME, CheckpointCorruptError, atomic_write, confined, released_config_dict,
                          save_pretrained, write_generation_config, write_json, write_tokenizer_config)
from ..checkpoint.dcp import DCP_DIR, load_sharded, save_sharded
from ..checkpoint.io import read_safetensors, writing
from ..checkpoint.training_state import (FORMAT_DCP, OPTIMIZER_FILE, RNG_FILE, STAGING_DIR, commit_checkpoint,
                                         open_staging, read_training_tensors, restore_rng_state, state_path)
from ..data.tokenizer import TOKENIZER_FILE, save_tokenizer
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
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{name}.{key}"] = st[key].detach().contiguous().cpu()
            steps[name] = float(st["step"])
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return tensors, {"step": steps, "param_groups": groups}

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`optimizer_state` (matching by parameter name)."""
        for name, p in self.model.named_parameters():
            if name not in meta["step"]:
                continue
            try:
                exp_avg, exp_avg_sq = tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"]
            except KeyError as e:
                raise CheckpointCorruptError(f"{self.out / OPTIMIZER_FILE} lacks tensor {e}") from None
            for key, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                if t.shape != p.shape or not t.is_floating_point():
                    raise CheckpointCorruptError(f"{self.out / OPTIMIZER_FILE}: {name}.{key} has shape "
                                                 f"{tuple(t.shape)} {t.dtype}, the parameter {tuple(p.shape)}")
            self.optimizer.state[p] = {
                "step": torch.tensor(meta["step"][name], dtype=torch.float32),
                "exp_avg": exp_avg.to(p.device, p.dtype), "exp_avg_sq": exp_avg_sq.to(p.device, p.dtype)}
        for g, saved in zip(self.optimizer.param_groups, meta["param_groups"]):
            g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})

    def _state_record(self, opt_meta: dict[str, Any]) -> dict[str, Any]:
        """The JSON training state of a checkpoint (step, config, schedule, data position...)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "train_config": asdict(self.cfg), "model_config": self.model_config.to_dict(),
                "scheduler": {"kind": "warmup_cosine", "peak_lr": self.cfg.lr, "warmup": self.cfg.warmup,
                              "total_steps": self.cfg.steps, "min_lr_ratio": self.cfg.min_lr_ratio,
                              "last_lr": self.lr(max(self.step - 1, 0))},
                "sampler": self.sampler.state_dict(), "optimizer": opt_meta, "data": self.data.summary}

    def _write_side_files(self, staging: Path) -> None:
        save_tokenizer(self.tokenizer, staging / TOKENIZER_FILE)
        write_tokenizer_config(staging, self.model_config)  # what transformers' AutoTokenizer reads

    def save_checkpoint(self) -> None:
        """Write a complete checkpoint atomically (see :func:`moge.checkpoint.training_state.commit_checkpoint`)."""
        if self.dist.world_size > 1:
            self._save_dcp()
            return
        from safetensors.torch import save_file

        opt_tensors, opt_meta = self.optimizer_state()
        self._lock.acquire()

        def write_files(staging: Path) -> None:
            save_pretrained(staging, self.model_config, self.model.state_dict())
            self._write_side_files(staging)
            save_file(opt_tensors, str(staging / OPTIMIZER_FILE), metadata={"format": "pt"})

        commit_checkpoint(self.out, write_files, self._state_record(opt_meta))

    def _dcp_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``({"model", "optim"} tensors for DCP, the optimizer's param_groups)``: DTensor shards under
        FSDP2, whole tensors on one process; names are the single-device ones."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # creates empty AdamW state if needed
        return {"model": model_sd, "optim": optim_sd["state"]}, optim_sd["param_groups"]

    def _save_dcp(self) -> None:
        """Every rank writes its shards into the staging directory; rank 0 adds config, tokenizer, RNG
        state and the manifest, and commits. A kill at any point leaves the previous checkpoint."""
        tensors, groups = self._dcp_state()
        if self.dist.is_main:
            self._lock.acquire()
            open_staging(self.out)
        self._barrier()
        with self.dist.busy("writing DCP shards"):
            save_sharded(self.out / STAGING_DIR / DCP_DIR, tensors)
        self._barrier()
        if self.dist.is_main:
            meta = {"step": {}, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]}

            def write_files(staging: Path) -> None:
                # config.json as the released layout writes it (float32 master weights), so moge convert
                # and a resume read the same model description.
                write_json(staging / CONFIG_NAME, released_config_dict(self.model_config, torch.float32))
                write_generation_config(staging, self.model_config)
                self._write_side_files(staging)

            with self.dist.busy("committing a checkpoint"):  # the others wait at the barrier
                commit_checkpoint(self.out, write_files, {"format": FORMAT_DCP, **self._state_record(meta)},
                                  staged=True)
        self._barrier()

    def _barrier(self) -> None:
        """Wait for every expert-parallel rank (no-op for one process)."""
        if self.dist.world_size > 1:
            torch.distributed.barrier(self.dist.group)

    def _load_dcp(self) -> None:
        """Read weights and AdamW moments from ``DIR/dcp`` into this rank's shards (any mesh)."""
        tensors, groups = self._dcp_state()
        load_sharded(confined(self.out, DCP_DIR), tensors)
        set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optim"], "param_groups": groups})

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Restore optimizer, schedule position, data position and RNGs from a verified checkpoint."""
        if state.get("format") == FORMAT_DCP:
            self._load_dcp()
            rng_tensors = read_safetensors(confined(self.out, RNG_FILE))
        else:
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

