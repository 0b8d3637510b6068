"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), read without running pickled code.

A DCP checkpoint is a directory of per-rank ``.distcp`` files plus ``.metadata`` (which tensor
regions live where). Every rank writes its own shards, and any mesh can read them back: DCP reads the
regions a rank's (differently sharded) tensors need, so a run saved at 4 ranks resumes at 2 or 1.

Hostile files: DCP stores tensors with ``torch.save`` and reads them with ``torch.load(weights_only=True)``,
but it unpickles ``.metadata`` and non-tensor values with plain pickle. Here the metadata goes through
an unpickler that only builds DCP's own metadata classes and torch sizes/dtypes
(:class:`SafeFileSystemReader`) and non-tensor values are refused (:class:`TensorsOnlyLoadPlanner`):
moge keeps only tensors in DCP (optimizer hyper-parameters live in the JSON training state). The training manifest (:mod:`.training_state`) hashes every file as well.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .io import CheckpointCorruptError

DCP_DIR = "dcp"
METADATA_NAME = ".metadata"

# The globals a DCP ``.metadata`` pickle may name (what torch 2.13 writes); anything else is refused.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch", "strided"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
     ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PureWindowsPath"), ("torch", "contiguous_format")} | {
    ("torch", name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                                 "uint8", "bool", "complex64", "complex128")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise CheckpointCorruptError(f"DCP metadata names {module}.{name}, which a checkpoint's metadata never "
                                         f"holds; refusing to unpickle it")
        return super().find_class(module, name)


def read_metadata(path: str | Path) -> Metadata:
    """The :class:`Metadata` of the DCP checkpoint in ``path``, through the restricted unpickler."""
    file = Path(path) / METADATA_NAME
    try:
        with file.open("rb") as f:
            md = _MetadataUnpickler(f).load()
    except CheckpointCorruptError:
        raise
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is not a DCP checkpoint ({METADATA_NAME} missing)") from None
    except Exception as e:
        raise CheckpointCorruptError(f"{file} is corrupt or truncated: {type(e).__name__}: {e}") from None
    if not isinstance(md, Metadata):
        raise CheckpointCorruptError(f"{file} does not hold DCP metadata")
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """:class:`torch.distributed.checkpoint.FileSystemReader` whose metadata read runs no pickled code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointCorruptError("per-rank DCP metadata is not used by moge checkpoints")
        md = read_metadata(self.path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, refusing non-tensor values (DCP would unpickle them with plain pickle;
    moge never stores any: optimizer hyper-parameters live in the JSON training state)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointCorruptError(f"the DCP checkpoint holds a pickled value at {read_item.dest_index.fqn!r}; "
                                     f"moge checkpoints hold tensors only")


def save_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and DTensors, nested dicts) as a DCP checkpoint into ``path``.

    A collective when a process group is initialised: every rank calls it with its own shards.
    """
    writer = dcp.FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True)
    with warnings.catch_warnings():  # one process without a process group is a supported use, not a mistake
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state, storage_writer=writer)


def load_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Fill ``state`` in place from the DCP checkpoint in ``path``, resharding to ``state``'s layout.

    Works in one process without a process group too (plain tensors receive whole tensors).
    Missing keys, wrong shapes and unreadable files raise :class:`CheckpointCorruptError`.
    """
    if not (Path(path) / METADATA_NAME).is_file():
        raise CheckpointCorruptError(f"{path} is not a DCP checkpoint ({METADATA_NAME} missing)")
    md = read_metadata(path)
    _check_against(md, state, path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=TensorsOnlyLoadPlanner())
    except CheckpointCorruptError:
        raise
    except Exception as e:  # DCP wraps per-rank failures in CheckpointException
        raise CheckpointCorruptError(f"cannot read the DCP checkpoint in {path}: {str(e).splitlines()[0][:500]}") \
            from None


def _flat_keys(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_against(md: Metadata, state: dict[str, Any], path) -> None:
    """Name what the checkpoint lacks or holds in another shape, before DCP's own deeper errors."""
    stored = md.state_dict_metadata
    missing, wrong = [], []
    for key, want in _flat_keys(state).items():
        if key not in stored:
            missing.append(key)
        elif isinstance(want, torch.Tensor):
            size = getattr(stored[key], "size", None)
            if size is not None and tuple(size) != tuple(want.shape):
                wrong.append(f"{key} {tuple(size)} vs {tuple(want.shape)}")
    if missing or wrong:
        raise CheckpointCorruptError(f"the DCP checkpoint in {path} does not fit this model: missing {missing[:6]}"
                                     f"{'...' if len(missing) > 6 else ''}; other shapes {wrong[:6]}")


def stored_keys(path: str | Path) -> dict[str, tuple[int, ...] | None]:
    """``{flattened key: global shape}`` of a DCP checkpoint (None for non-tensor values)."""
    md = read_metadata(path)
    return {k: (tuple(v.size) if hasattr(v, "size") else None) for k, v in md.state_dict_metadata.items()}
