"""Convert checkpoints to the released Pangu Pro MoE layout (re-shard, change dtype, import a state dict).

``moge convert SRC DST``: SRC is a checkpoint directory in the released layout (``config.json`` plus
safetensors shards) or a single state-dict file of :class:`MoGEForCausalLM` (``.safetensors``, or ``.pt``
read with ``torch.load(weights_only=True)``; stacked or per-expert names) together with ``--config`` /
``--preset``. DST is written in the released layout (docs/design.md section 5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import MoGEConfig
from .io import CheckpointError, confined
from .layout import IGNORED_RE, PER_EXPERT_RE, check_names_and_shapes, from_published_state_dict
from .pretrained import build_on_meta, load_pretrained, normalise_names, read_config, save_model
from .reading import CONFIG_NAME, TOKENIZER_NAME, check_tokenizer_file, resolve_dtype
from .training_state import verify_files


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
            progress: bool = False, verify: bool = True) -> Path:
    """Convert ``src`` (a checkpoint directory or a state-dict file) into the released layout at ``dst``.

    A directory is loaded with :func:`load_pretrained` and re-written (re-sharded, optionally cast).
    A file is read as a :class:`MoGEForCausalLM` state dict with stacked or per-expert expert names and
    needs ``config`` (or a ``config.json`` next to it). Tensors are checked against the config.
    """
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
        model = load_pretrained(src, dtype=tdtype, verify=verify)
        own = confined(src, TOKENIZER_NAME)
        if tokenizer_file is None and own.is_file():
            if verify:
                verify_files(src, [TOKENIZER_NAME])
            tokenizer_file = check_tokenizer_file(own)
        return save_model(model, dst, max_shard_size, tokenizer_file, progress)
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
    return save_model(model, dst, max_shard_size, tokenizer_file, progress)


