"""What both checkpoint formats (float released layout, Ascend W8A8) share when reading: dtype and
device arguments, manifest verification, NaN/inf refusal, tensor readers, assigning a loaded state dict
to a meta-device model, and the tokenizer-file check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..config import MoGEConfig
from ..model import RotaryEmbedding
from .io import INDEX_NAME, CheckpointCorruptError, CheckpointError, confined
from .training_state import verify_files


CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# Integer tensors that mark a quantized checkpoint (Ascend W8A8 stores int8 weights and int32 biases).
QUANT_DTYPES = ("I8", "U8", "int8", "uint8")
# What a float checkpoint may store (safetensors' dtype names).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``"auto"`` -> None (keep the stored dtype); a floating name or ``torch.dtype`` -> that dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise DtypeArgumentError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}, the matching torch "
                             f"dtypes, or 'auto'")


class DtypeArgumentError(CheckpointError, ValueError):
    """A ``dtype`` argument that is not a floating dtype moge loads weights in."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; :class:`CheckpointError` (a ``ValueError``)
    naming it otherwise, before anything is read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DtypeArgumentError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise DtypeArgumentError(f"device {device!r}: " + ("CUDA is not available" if not torch.cuda.is_available()
                                 else f"only {torch.cuda.device_count()} CUDA device(s)"))
    return dev


def verify_against_manifest(directory: Path, files) -> bool:
    """When ``directory`` has a training manifest, check ``config.json``, the index and ``files``
    (paths of shards) against it, streaming each file through SHA-256; False when it has none."""
    # Shard paths were built by joining names onto ``directory`` (see weight_files), so relative_to
    # recovers the name exactly, whether ``directory`` is relative, absolute or a symbolic link.
    names = [CONFIG_NAME] + ([INDEX_NAME] if (directory / INDEX_NAME).is_file() else []) + sorted(
        {Path(f).relative_to(directory).as_posix() for f in files})
    return verify_files(directory, names)


def refuse_non_finite(name: str, t: Tensor, where: str) -> None:
    """:class:`CheckpointCorruptError` naming the tensor when a floating tensor holds NaN or inf."""
    # Fast path: NaN/inf propagate through a sum (one streaming pass, ~0.06 s/GB on one core against
    # ~1.5 s/GB for isfinite). A non-finite sum may also be an overflow (float16), so it is confirmed.
    if not (t.is_floating_point() and t.numel()) or torch.isfinite(t.sum()):
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointCorruptError(f"tensor {name} in {where} holds {bad} non-finite value(s) (NaN or inf) out "
                                     f"of {t.numel()}; refusing to load it (verify=False / --no-verify skips "
                                     f"this check)")


def tensor_reader(handles: Mapping[Path, Any], files: Mapping[str, Path], verify: bool):
    """``read(name) -> Tensor`` over open shard ``handles``: unreadable tensors named, and with
    ``verify`` NaN/inf refused by name (:func:`refuse_non_finite`)."""
    def read(name: str) -> Tensor:
        try:
            t = handles[files[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {files[name]}: {e}") from None
        if verify:
            refuse_non_finite(name, t, str(files[name]))
        return t
    return read


def assign_loaded(module: torch.nn.Module, sd: dict[str, Tensor], config: MoGEConfig,
                  device: str | torch.device) -> torch.nn.Module:
    """Assign a complete loaded state dict (our names) to a meta-device model: ties the head to the
    embedding when the config says so and rebuilds the RoPE buffer on ``device``."""
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    module.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    # Non-persistent buffer: rebuilt from the config on the target device, always float32.
    module.model.rotary = RotaryEmbedding(config.resolved_head_dim, config.rope_theta).to(device)
    return module


def check_tokenizer_file(path: str | Path) -> Path:
    """``path`` if it is a tokenizer file that ``tokenizers`` can load; :class:`CheckpointError` otherwise,
    so that no other file is ever copied into a checkpoint as its ``tokenizer.json``."""
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"tokenizer file {src} does not exist" if not src.exists() else
                              f"tokenizer file {src} is not a regular file")
    try:
        Tokenizer.from_file(str(src))
    except Exception as e:  # tokenizers raises a bare Exception on anything it cannot parse
        raise CheckpointError(f"{src} is not a tokenizer file (tokenizers cannot load it: "
                              f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    return src


def read_tokenizer(directory: str | Path, verify: bool = True) -> Tokenizer | None:
    """The checkpoint's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (checked against the manifest
    with ``verify``), or None when the checkpoint has none; an unreadable file is a :class:`CheckpointError`."""
    directory = Path(directory)
    path = confined(directory, TOKENIZER_NAME)
    if not path.is_file():
        return None
    if verify:
        verify_files(directory, [TOKENIZER_NAME])
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on anything it cannot parse
        raise CheckpointError(f"cannot read tokenizer {path}: {e}") from None
