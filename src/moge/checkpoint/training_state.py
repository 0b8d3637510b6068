"""The training half of a checkpoint: optimizer and RNG state, the manifest, and the commit protocol.

A single-process training output directory is a released-layout checkpoint (``config.json`` + weights) plus
``tokenizer.json``, ``optimizer.safetensors`` (AdamW moments keyed by parameter name),
``rng_state.safetensors`` and ``moge_training_state.json`` (step, schedule, data position, RNG
scalars and the manifest: every file's size and SHA-256). Nothing is pickled. The state file has its
own name so that transformers' ``Trainer`` (whose ``trainer_state.json`` means something else) never
mistakes the directory for one of its checkpoints; runs written under the old name still resume.

A multi-process run (FSDP2) writes ``format: "dcp"`` instead: the weights and AdamW moments as a DCP
checkpoint in ``DIR/dcp/`` (every rank its own shards, :mod:`.dcp`), with the same config, tokenizer,
RNG state and manifest; ``moge convert`` turns it into the released layout.

Checkpoints are committed atomically: every file is written into ``DIR/.ckpt-staging``, the finished
staging directory is renamed to ``DIR/.ckpt-commit`` (the commit point), and its files are then moved
into ``DIR``. A run killed at any moment leaves either the previous or the new checkpoint; an
interrupted move is rolled forward the next time the directory is opened for training. Every file
name taken from a manifest is confined to the directory before it is read, hashed or deleted.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dcp import DCP_DIR, METADATA_NAME
from .io import (INDEX_NAME, WEIGHTS_NAME, CheckpointCorruptError, CheckpointError, confined, fsync_dir, read_json,
                 read_safetensors, sha256_file, write_json, writing)

STATE_FILE = "moge_training_state.json"
LEGACY_STATE_FILE = "trainer_state.json"  # moge 0.1 wrote this name; read, never written
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
STAGING_DIR = ".ckpt-staging"
COMMIT_DIR = ".ckpt-commit"
STATE_VERSION = 1
OLD_PREFIX = ".ckpt-old-"  # a directory of the previous checkpoint, moved aside while the new one moves in
# Files every training checkpoint has besides its weights; the manifest must list them.
REQUIRED_FILES = ("config.json", "tokenizer.json", OPTIMIZER_FILE, RNG_FILE)
FORMAT_DCP = "dcp"
REQUIRED_DCP_FILES = ("config.json", "tokenizer.json", RNG_FILE, f"{DCP_DIR}/{METADATA_NAME}")


def state_path(out: str | Path) -> Path | None:
    """The training-state file of ``out`` (the current name, else a moge-0.1 one), or None."""
    out = Path(out)
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        p = confined(out, name)
        if p.is_file():
            if name == LEGACY_STATE_FILE:
                try:  # transformers' Trainer writes the same name: only ours has a version and a manifest
                    d = read_json(p)
                except Exception:
                    return p  # a damaged moge state: verify_checkpoint names it
                if not (isinstance(d, dict) and "files" in d and "version" in d):
                    continue
            return p
    return None


def has_checkpoint(out: str | Path) -> bool:
    """True when ``out`` holds a committed (or half-committed) training checkpoint."""
    return state_path(out) is not None or (Path(out) / COMMIT_DIR).exists()


# ---- RNG state without pickle ------------------------------------------------------------------------

def rng_state_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch/numpy/python RNG states as tensors plus JSON-able scalars."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, pystate, gauss_next = random.getstate()
    meta = {"numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next}}
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state_tensors`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n["name"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---- the commit protocol -----------------------------------------------------------------------------

def recover_checkpoint_dir(out: Path) -> None:
    """Finish or discard an interrupted checkpoint write in ``out``.

    A complete commit directory is rolled forward (its remaining files moved into place, the state
    file last); a staging directory that never reached the commit point is deleted.
    """
    out = Path(out)
    commit = out / COMMIT_DIR
    for d in (commit, out / STAGING_DIR):
        if d.is_symlink():  # we only ever make real directories here: a link is not ours to follow
            raise CheckpointError(f"{d} is a symbolic link (to {os.readlink(d)}); moge never creates one, so it "
                                  f"refuses to roll it forward or clean it up. Remove the link and retry")
    if commit.is_dir():
        names = sorted(p.name for p in commit.iterdir())
        for name in sorted(names, key=lambda n: n == STATE_FILE):  # state file last
            _move_into_place(commit / name, out / name)
        fsync_dir(out)
        commit.rmdir()
    for old in out.glob(OLD_PREFIX + "*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
    staging = out / STAGING_DIR
    if staging.is_file():
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)


def _move_into_place(src: Path, dst: Path) -> None:
    """``os.replace`` for a file; a directory (the DCP shards) first moves the old one aside, since a
    rename cannot replace a non-empty directory. Rolling forward again after a kill is safe."""
    if src.is_dir() and dst.is_dir() and not dst.is_symlink():
        aside = dst.parent / f"{OLD_PREFIX}{dst.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside)
    else:
        os.replace(src, dst)


def open_staging(out: Path) -> Path:
    """Finish or discard an interrupted write, then create the empty staging directory and return it
    (for checkpoints whose files several processes write before one commits them)."""
    out = Path(out)
    recover_checkpoint_dir(out)
    staging = out / STAGING_DIR
    staging.mkdir(parents=True)
    return staging


def _listed_files(out: Path) -> set[str]:
    """Names in the current manifest, for removal after a commit (only names confined to ``out``)."""
    p = state_path(out)
    if p is None:
        return set()
    try:
        files = read_json(p).get("files", {})
    except Exception:
        return set()
    keep = set()
    for name in files if isinstance(files, dict) else ():
        try:
            confined(out, name, "manifest entry")
        except Exception:
            continue  # a hostile entry is never deleted
        keep.add(name)
    return keep


def commit_checkpoint(out: Path, write_files: Callable[[Path], None], state: dict[str, Any],
                      staged: bool = False) -> None:
    """Write a complete training checkpoint into ``out`` atomically.

    ``write_files(staging)`` writes the weights, tokenizer and optimizer files; this adds the RNG
    state, the manifest (size and SHA-256 of every file) and ``state`` (plus ``version`` and
    ``files``), renames staging to the commit directory (the commit point) and moves it into place.
    Files of the previous checkpoint that the new one no longer has (e.g. shards of another layout)
    are removed afterwards. ``staged``: the staging directory was made by :func:`open_staging` and
    already holds files (DCP shards written by every rank); the manifest covers them too.
    """
    from safetensors.torch import save_file

    out = Path(out)
    staging = out / STAGING_DIR
    if not staged:
        recover_checkpoint_dir(out)
    step = state.get("step", "?")
    try:
        with writing(f"the checkpoint of step {step} to", out, "the previous checkpoint is intact"):
            staging.mkdir(parents=True, exist_ok=staged)
            write_files(staging)
            rng_tensors, rng_meta = rng_state_tensors()
            save_file(rng_tensors, str(staging / RNG_FILE))
            files = {}
            for p in sorted(staging.rglob("*")):
                if p.is_dir():
                    continue
                with p.open("rb") as f:
                    os.fsync(f.fileno())
                files[p.relative_to(staging).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            write_json(staging / STATE_FILE, {"version": STATE_VERSION, **state, "rng": rng_meta, "files": files})
            fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # give the space back; the commit point was not reached
        raise
    old = _listed_files(out)
    os.replace(staging, out / COMMIT_DIR)  # the commit point
    fsync_dir(out)
    recover_checkpoint_dir(out)
    for name in old - set(files) - {STATE_FILE}:
        (out / name).unlink(missing_ok=True)
        parent = (out / name).parent
        if parent != out and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()  # e.g. dcp/ after a run resumed on one process wrote the released layout
    if state_path(out) == out / STATE_FILE and (out / LEGACY_STATE_FILE).is_file():
        legacy = read_json(out / LEGACY_STATE_FILE)
        if isinstance(legacy, dict) and "files" in legacy and "version" in legacy:
            (out / LEGACY_STATE_FILE).unlink()  # superseded by the new name


def _check_file(out: Path, path: Path, name: str, meta: Any, state_file: Path) -> None:
    """One manifest entry against the file on disk (size first, then the SHA-256, streamed)."""
    file = confined(out, name, "manifest entry")
    if not file.is_file():
        raise CheckpointCorruptError(f"checkpoint file {file} is missing")
    if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
        raise CheckpointCorruptError(f"{state_file}: the manifest entry of {name!r} is malformed")
    size = file.stat().st_size
    if size != meta["bytes"]:
        raise CheckpointCorruptError(f"checkpoint file {file} is truncated or altered: {size} bytes, "
                                     f"expected {meta['bytes']}")
    if sha256_file(file) != meta["sha256"]:
        raise CheckpointCorruptError(f"checkpoint file {file} is corrupt: its SHA-256 does not match "
                                     f"{state_file.name}")


def read_manifest(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(state file, training state)`` of ``out`` when it has a manifest, else None (a released
    checkpoint). A state file that exists but cannot be a manifest raises :class:`CheckpointCorruptError`."""
    out = Path(out)
    path = state_path(out)
    if path is None:
        return None
    try:
        state = read_json(path, "training state")
    except Exception as e:
        raise CheckpointCorruptError(f"{path} is corrupt or truncated: {e}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("files"), dict):
        raise CheckpointCorruptError(f"{path} is not a moge training state (version {STATE_VERSION} with a "
                                     f"'files' manifest)")
    return path, state


def verify_files(out: Path, names) -> bool:
    """Check ``names`` (paths relative to the checkpoint ``out``) against ``out``'s manifest; False when
    there is none.

    Every name must be listed (a checkpoint with a manifest covers every file a loader reads) and
    match its size and SHA-256; raises :class:`CheckpointCorruptError` naming the first that does not.
    Names are always relative to ``out``, never to the working directory, so ``out`` itself may be
    given relative, absolute or through a symbolic link.
    """
    out = Path(out)
    found = read_manifest(out)
    if found is None:
        return False
    path, state = found
    for name in names:
        rel = Path(name).as_posix()
        if rel not in state["files"]:
            raise CheckpointCorruptError(f"{out / rel} is not listed in the manifest of {path}; the checkpoint "
                                         f"was altered after it was written")
        _check_file(out, out / rel, rel, state["files"][rel], path)
    return True


_STATE_SCHEMA = {"step": int, "tokens_seen": int, "train_config": dict, "model_config": dict, "sampler": dict,
                 "optimizer": dict, "rng": dict}


def check_state(state: dict[str, Any], path: Path) -> None:
    """The fields ``moge train --resume`` reads, with their types; :class:`CheckpointCorruptError` naming
    the first that is missing or wrong (a hand-edited state file)."""
    def need(d: Any, key: str, typ, where: str) -> Any:
        v = d.get(key) if isinstance(d, dict) else None
        if isinstance(v, bool) and typ in (int, float) or not isinstance(v, typ):
            kind = typ.__name__ if not isinstance(typ, tuple) else " or ".join(t.__name__ for t in typ)
            raise CheckpointCorruptError(f"{path}: {where}{key!r} must be {kind}, got {v!r}")
        return v

    for key, typ in _STATE_SCHEMA.items():
        need(state, key, typ, "")
    if state["step"] < 0 or state["tokens_seen"] < 0:
        raise CheckpointCorruptError(f"{path}: 'step' and 'tokens_seen' must be >= 0")
    for key in ("seed", "epoch", "position", "num_rows"):
        if need(state["sampler"], key, int, "sampler ") < 0:
            raise CheckpointCorruptError(f"{path}: sampler {key!r} must be >= 0, got {state['sampler'][key]}")
    if state["sampler"]["position"] >= max(state["sampler"]["num_rows"], 1):
        raise CheckpointCorruptError(f"{path}: sampler position {state['sampler']['position']} is not below its "
                                     f"num_rows {state['sampler']['num_rows']}")
    steps = need(state["optimizer"], "step", dict, "optimizer ")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in steps.values()):
        raise CheckpointCorruptError(f"{path}: optimizer 'step' must map parameter names to numbers")
    groups = need(state["optimizer"], "param_groups", list, "optimizer ")
    if not all(isinstance(g, dict) for g in groups):
        raise CheckpointCorruptError(f"{path}: optimizer 'param_groups' must be a list of objects")
    n = need(state["rng"], "numpy", dict, "rng ")
    for key, typ in (("name", str), ("pos", int), ("has_gauss", int), ("cached_gaussian", (int, float))):
        need(n, key, typ, "rng numpy ")
    py = need(state["rng"], "python", dict, "rng ")
    need(py, "version", int, "rng python ")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in need(py, "state", list, "rng python ")):
        raise CheckpointCorruptError(f"{path}: rng python 'state' must be a list of integers")


def verify_checkpoint(out: Path) -> dict[str, Any]:
    """Read the training state of ``out`` and check every file it lists (size and SHA-256); return it.

    The manifest must list the files a resume reads (config, weights, tokenizer, optimizer and RNG
    state) and the state the fields it uses (:func:`check_state`). Raises
    :class:`CheckpointCorruptError` naming the first missing, truncated, altered or unlisted file or
    malformed field, and :class:`~.io.CheckpointError` for a manifest entry that points outside ``out``.
    """
    out = Path(out)
    found = read_manifest(out)
    if found is None:
        raise CheckpointCorruptError(f"{out} holds no training checkpoint ({STATE_FILE} missing)")
    path, state = found
    files = state["files"]
    for name, meta in files.items():
        _check_file(out, out / str(name), name, meta, path)
    weights = [n for n in (WEIGHTS_NAME, INDEX_NAME) if n in files]
    if state.get("format") == FORMAT_DCP:
        missing = [n for n in REQUIRED_DCP_FILES if n not in files]
    else:
        missing = [n for n in REQUIRED_FILES if n not in files] + ([] if weights else [WEIGHTS_NAME])
    if missing:
        raise CheckpointCorruptError(f"{path}: the manifest does not list {missing}; the checkpoint was altered "
                                     f"after it was written")
    if INDEX_NAME in files:
        index = read_json(out / INDEX_NAME, "safetensors index")
        shards = set((index.get("weight_map") or {}).values()) if isinstance(index, dict) else set()
        unlisted = sorted(str(s) for s in shards if s not in files)
        if unlisted:
            raise CheckpointCorruptError(f"{path}: the manifest does not list the shards {unlisted}")
    check_state(state, path)
    return state


def read_training_tensors(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(optimizer tensors, RNG tensors)`` of a verified checkpoint directory."""
    out = Path(out)
    return read_safetensors(out / OPTIMIZER_FILE), read_safetensors(out / RNG_FILE)
