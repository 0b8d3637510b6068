"""Convert checkpoints to the released Pangu Pro MoE layout (re-shard, change dtype, import a state dict).

``moge convert SRC DST``: SRC is a checkpoint directory in the released layout (``config.json`` plus
safetensors shards), a DCP checkpoint directory (a multi-process ``moge train`` run's output, or
``--to dcp``'s), or a single state-dict file of :class:`MoGEForCausalLM` (``.safetensors``, or ``.pt``
read with ``torch.load(weights_only=True)``; stacked or per-expert names) together with ``--config`` /
``--preset``. DST is written in the released layout (docs/design.md section 5), or with ``--to dcp`` as
``config.json`` + ``tokenizer.json`` + ``dcp/`` (the model's tensors as one DCP checkpoint, which any
mesh can read).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor

from ..config import MoGEConfig
from .dcp import DCP_DIR, METADATA_NAME, load_sharded, save_sharded
from .hf_files import write_generation_config, write_tokenizer_config
from .io import CheckpointError, atomic_write, confined, writable_dir, write_json, writing
from .layout import IGNORED_RE, PER_EXPERT_RE, check_names_and_shapes, from_published_state_dict, released_config_dict
from .pretrained import build_on_meta, load_pretrained, normalise_names, read_config, save_model
from .reading import CONFIG_NAME, TOKENIZER_NAME, check_tokenizer_file, refuse_non_finite, resolve_dtype
from .training_state import has_checkpoint, verify_checkpoint, verify_files


def _read_state_dict_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
    # A training checkpoint may wrap the weights: {"model": state_dict, "optimizer": ...}.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def convert(src: str | Path, dst: str | Path, max_shard_size: int | str = "2GB", dtype: str | None = None,
            config: MoGEConfig | None = None, tokenizer_file: str | Path | None = None,
            progress: bool = False, verify: bool = True, to: str = "released") -> Path:
    """Convert ``src`` (a checkpoint directory or a state-dict file) into the released layout at ``dst``.

    A directory is loaded with :func:`load_pretrained` and re-written (re-sharded, optionally cast).
    A file is read as a :class:`MoGEForCausalLM` state dict with stacked or per-expert expert names and
    needs ``config`` (or a ``config.json`` next to it). Tensors are checked against the config.
    ``to="dcp"`` writes DST as a DCP directory (:func:`save_dcp_model`) instead.
    """
    if to not in ("released", "dcp"):
        raise CheckpointError(f"--to must be 'released' or 'dcp', got {to!r}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise CheckpointError(f"source {src} does not exist")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a directory; choose a new directory")
    if tokenizer_file is not None:
        check_tokenizer_file(tokenizer_file)
    if dst.exists() and dst.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise CheckpointError(f"destination {dst} is the source directory; write to a new directory")
    tdtype = resolve_dtype(dtype)
    if src.is_dir():
        if config is not None:
            raise CheckpointError("--config/--preset are only for a state-dict file; a directory has its config.json")
        model = load_dcp_model(src, tdtype, verify) if is_dcp_dir(src) else load_pretrained(src, dtype=tdtype,
                                                                                           verify=verify)
        own = confined(src, TOKENIZER_NAME)
        if tokenizer_file is None and own.is_file():
            if verify:
                verify_files(src, [TOKENIZER_NAME])
            tokenizer_file = check_tokenizer_file(own)
        return _write(model, dst, to, max_shard_size, tokenizer_file, progress)
    if config is None:
        if (src.parent / CONFIG_NAME).is_file():
            config = read_config(src.parent)
        else:
            raise CheckpointError(f"{src} is a state-dict file: pass --config CONFIG.json or --preset NAME")
    sd = normalise_names(_read_state_dict_file(src))
    if any(PER_EXPERT_RE.match(k) for k in sd):
        sd = from_published_state_dict(sd, config)
    model = build_on_meta(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
    sd = {k: v for k, v in sd.items() if not IGNORED_RE.search(k)}
    check_names_and_shapes(str(src), expected, {k: tuple(v.shape) for k, v in sd.items()})
    if tdtype is not None:
        sd = {k: v.to(tdtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return _write(model, dst, to, max_shard_size, tokenizer_file, progress)


def _write(model, dst: Path, to: str, max_shard_size, tokenizer_file, progress: bool) -> Path:
    if to == "dcp":
        return save_dcp_model(model, dst, tokenizer_file)
    return save_model(model, dst, max_shard_size, tokenizer_file, progress)


def is_dcp_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a DCP checkpoint of a model (``dcp/.metadata`` next to ``config.json``)."""
    return (Path(path) / DCP_DIR / METADATA_NAME).is_file() and (Path(path) / CONFIG_NAME).is_file()


def load_dcp_model(src: str | Path, dtype: torch.dtype | None = None, verify: bool = True):
    """The whole model of a DCP checkpoint directory in one process (shards of any mesh are joined).

    A training checkpoint is first checked against its manifest (every file's SHA-256); NaN/inf
    weights are refused like :func:`load_pretrained` does.
    """
    src = Path(src)
    if verify and has_checkpoint(src):
        verify_checkpoint(src)
    config = read_config(src)
    model = build_on_meta(config).to_empty(device="cpu")
    sd = model.state_dict()
    load_sharded(confined(src, DCP_DIR), {"model": sd})
    for name, t in sd.items():
        if verify and t.is_floating_point():
            refuse_non_finite(name, t, str(src))
    return model.to(dtype) if dtype is not None else model


def save_dcp_model(model, dst: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write ``model`` as ``config.json`` (+ ``tokenizer.json``) + ``dcp/`` (its tensors, one process)."""
    dst = Path(dst)
    writable_dir(dst, "checkpoint directory")
    with writing("checkpoint", dst):
        if (dst / DCP_DIR).exists():
            raise CheckpointError(f"{dst / DCP_DIR} exists; write to a new directory")
        save_sharded(dst / DCP_DIR, {"model": model.state_dict()})
        config = model.config
        dtypes = {p.dtype for p in model.parameters()}
        write_json(dst / CONFIG_NAME, released_config_dict(config, next(iter(dtypes)) if len(dtypes) == 1 else None))
        write_generation_config(dst, config)
        if tokenizer_file is not None:
            atomic_write(dst / TOKENIZER_NAME, lambda tmp: shutil.copyfile(tokenizer_file, tmp))
            write_tokenizer_config(dst, config)
    return dst
