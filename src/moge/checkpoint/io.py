"""Checkpoint file I/O: atomic writes, paths confined to the checkpoint, safetensors shards, hashing.

Everything here is about files, not about what the tensors mean (that is :mod:`.layout`). Two rules
hold for every function:

* Writes are atomic: a temporary file in the same directory, fsync, ``os.replace``, fsync of the
  directory. A reader (or a crash) sees the old file or the complete new one, never half of one.
* A file name read *from* a checkpoint (an index's shard names, a manifest's file list) is confined
  to the checkpoint directory by :func:`confined`: no absolute paths, no ``..``, no symbolic link
  that leads out. A crafted checkpoint cannot make us read, hash, overwrite or delete anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import MoGEError
from ..progress import progress as progress_bar


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(MoGEError):
    """A checkpoint directory or file that cannot be read or written; the message names the file or tensor."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or altered (its size or SHA-256 differs from the record)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, read-only or unwritable directory); the message
    names the file and the system's reason."""


@contextlib.contextmanager
def writing(what: str, path: str | Path, note: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``what`` at ``path`` into :class:`CheckpointWriteError`
    naming the path and the reason (``note`` says what is still intact)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        # safetensors reports its own I/O failures (a full disk, a file size limit) as SafetensorError
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        where = getattr(e, "filename", None) or path
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise CheckpointWriteError(f"cannot write {what} {path}: {reason} ({where})" + (f"; {note}" if note else "")) \
            from None


def writable_dir(path: str | Path, what: str) -> Path:
    """``path`` as an output directory: refuse an existing non-directory, and create it (with parents),
    raising :class:`CheckpointWriteError` naming the reason when it cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointWriteError(f"{what} {path} exists and is not a directory; choose a directory")
    with writing(what, path):
        path.mkdir(parents=True, exist_ok=True)
    return path


# ---- paths -----------------------------------------------------------------------------------------

def confined(directory: str | Path, name: str, what: str = "file") -> Path:
    """``directory / name`` for a ``name`` read from a checkpoint, refusing anything that leaves it.

    Rejects non-strings, empty names, absolute paths, ``..`` components and names whose resolved path
    (symbolic links followed) is outside ``directory``; raises :class:`CheckpointError` naming the
    entry. Subdirectories inside the checkpoint are allowed.
    """
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{directory}: invalid {what} name {name!r} in the checkpoint's metadata")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise CheckpointError(f"{directory}: {what} {name!r} points outside the checkpoint directory; refusing it")
    full = directory / p
    root = directory.resolve()
    resolved = full.resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError(f"{directory}: {what} {name!r} is a link that leads outside the checkpoint "
                              f"directory (to {resolved}); refusing it")
    return full


# ---- atomic writes ---------------------------------------------------------------------------------

def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames inside it survive a crash (a no-op where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write_fn: Callable[[str], Any]) -> None:
    """Write ``path`` through ``write_fn(tmp_path)`` on a temporary file in the same directory, fsync
    it, then ``os.replace`` it into place and fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, write)


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; :class:`CheckpointError` naming the file if it is unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable {what}: {e}") from None


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (streams: constant memory at any size)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_size(size: int | str) -> int:
    """Bytes from ``int`` or a string like ``"2GB"``, ``"500MB"``, ``"10KB"``, ``"1GiB"`` (GB = 10^9)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot parse size {size!r}; write e.g. 2GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    value = int(float(m.group(1)) * base ** power)
    if value < 1:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def listing(what: str, names, limit: int = 12) -> str:
    """``"what (n): a, b, c ... and k more"`` for error messages."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{what} ({len(names)}): {shown}{more}"


# ---- safetensors shards ----------------------------------------------------------------------------

def weight_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file of a checkpoint directory (from the index, or the single file).

    Shard names in the index are confined to the directory (see :func:`confined`).
    """
    directory = Path(directory)
    index = confined(directory, INDEX_NAME)
    if index.is_file():
        data = read_json(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' object)")
        shards = {fname: confined(directory, fname, "shard") for fname in set(weight_map.values())}
        absent = sorted(str(p) for p in shards.values() if not p.is_file())
        if absent:
            raise CheckpointError(listing(f"shard files named in {index} are missing", absent))
        return {name: shards[fname] for name, fname in weight_map.items()}
    single = confined(directory, WEIGHTS_NAME)
    if single.is_file():
        with open_shards([single]) as handles:
            return {name: single for name in handles[single].keys()}
    if (directory / "dcp" / ".metadata").is_file():  # a multi-process training run's sharded checkpoint
        raise CheckpointError(f"{directory} holds a sharded DCP checkpoint (dcp/), not the released layout; "
                              f"turn it into one with: moge convert {directory} {directory}-hf")
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}"
                          + (f" (found {', '.join(found)})" if found else ""))


@contextlib.contextmanager
def open_shards(paths) -> Iterator[dict[Path, Any]]:
    """Memory-mapped ``safe_open`` handles for ``paths``; unreadable files raise :class:`CheckpointError`."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = {}
        for path in paths:
            try:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
                raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        yield handles


def header_shapes(files: Mapping[str, Path], handles: Mapping[Path, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named tensors from the shard headers only (nothing is read or allocated)."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        present = set(handles[path].keys())
        lost = [n for n in names if n not in present]
        if lost:
            raise CheckpointError(listing(f"tensors listed in the index are absent from {path}", lost))
        for n in names:
            shapes[n] = tuple(handles[path].get_slice(n).get_shape())
    return shapes


def shard_plan(tensors: Mapping[str, Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split of names (in order) into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_shards(tensors: Mapping[str, Tensor], directory: str | Path, max_shard_size: int | str = "2GB",
                progress: bool = False) -> list[str]:
    """Write tensors as safetensors (one file, or shards plus an index); returns the file names.

    Every file is written atomically. Shards are copied to contiguous CPU tensors one shard at a time,
    so peak extra memory is about one shard. Stale shards of an earlier save are removed afterwards.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(tensors, parse_size(max_shard_size))
    names = ([WEIGHTS_NAME] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    bar = None
    if progress:
        bar = progress_bar(sum(t.numel() * t.element_size() for t in tensors.values()), f"writing {directory.name}",
                       "B", unit_scale=True)
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, plan):
        # clone(): per-expert views share storage with the stacked tensor, which safetensors refuses.
        data = {n: tensors[n].detach().to("cpu").contiguous().clone() for n in shard}
        atomic_write(directory / fname, lambda tmp, data=data: save_file(data, tmp, metadata={"format": "pt"}))
        for n, t in data.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
            if bar is not None:
                bar.update(t.numel() * t.element_size())
        del data
    if bar is not None:
        bar.close()
    if len(plan) > 1:
        write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif (directory / INDEX_NAME).exists():
        (directory / INDEX_NAME).unlink()
    for old in directory.glob("model*.safetensors"):
        if old.name not in names:
            old.unlink()
    return names


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of one safetensors file; :class:`CheckpointCorruptError` naming it if unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointCorruptError(f"cannot read {path}: {e}") from None


def to_dtype_device(t: Tensor, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    """``t`` on ``device`` in ``dtype`` (None keeps the stored dtype)."""
    return t.to(device=device, dtype=dtype or t.dtype)
