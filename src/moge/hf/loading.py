"""``from_pretrained`` / ``save_pretrained`` of the transformers wrapper classes: moge's memory-mapped
loader (:mod:`moge.checkpoint`) behind transformers' keywords.

A checkpoint's ``model.*`` tensors are the backbone (:class:`~moge.model.MoGEModel`) wherever a class
keeps it (``model`` in the causal LM and the base model, ``model.model`` in heads built on the base
model). The backbone must be complete and of the right shapes (else ``CheckpointError`` naming the
tensors). A class's own head (``lm_head``, ``score``, ``qa_outputs``) that the checkpoint lacks is
initialised and reported, and tensors the class does not use are skipped and reported, as
transformers does (``output_loading_info=True`` returns the report).

Keywords: ``dtype``/``torch_dtype``, ``device_map`` (one device, also as a per-module map whose modules
all go to that device; several devices are refused: the model is single-device, ``moge.parallel``
shards it), ``key_mapping`` (regex -> replacement on the checkpoint's tensor names as moge reads them,
experts already stacked), ``output_loading_info``, ``tqdm_class`` (transformers uses it for Hub
downloads only; moge reads local directories) and config attributes (``output_router_logits=True``,
``num_labels=3``, ``tie_word_embeddings=...``) and moge's ``verify`` (default True: the training
manifest's SHA-256 and the NaN/inf refusal of :func:`moge.checkpoint.load_state_dict`). Anything else
is refused by name.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from ..checkpoint import CONFIG_NAME, CheckpointError, load_into, load_state_dict, read_config, resolve_dtype
from ..checkpoint.io import header_shapes, listing, open_shards, weight_files
from ..checkpoint.layout import IGNORED_RE, PER_EXPERT_RE, from_published_state_dict, quantization_format
from ..config import read_config_dict
from ..model import MoGEModel, RotaryEmbedding, init_module
from .forward import UnsupportedArgumentError

# Only meaningful for Hub downloads or for transformers' own loader.
_IGNORED = {"trust_remote_code", "low_cpu_mem_usage", "local_files_only", "use_safetensors", "cache_dir",
            "force_download", "proxies", "revision", "token", "_from_auto", "_from_pipeline", "adapter_kwargs",
            "tqdm_class", "subfolder"}
# transformers-level config.json keys kept next to the architecture moge reads.
_HF_CONFIG_KEYS = ("use_cache", "output_router_logits", "id2label", "label2id", "problem_type")
_ATTENTION = (None, "sdpa", "eager")  # the model runs SDPA; eager attentions come with output_attentions
BACKBONE_PREFIX = "model."


def backbone_path(model: nn.Module) -> str:
    """Qualified name of the :class:`MoGEModel` inside a wrapper (``model`` or ``model.model``)."""
    return next(name for name, mod in model.named_modules() if isinstance(mod, MoGEModel))


def to_model_names(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint names (backbone under ``model.``) -> ``model``'s parameter names."""
    bb = backbone_path(model) + "."
    return {bb + k[len(BACKBONE_PREFIX):] if k.startswith(BACKBONE_PREFIX) else k: v for k, v in sd.items()}


def to_checkpoint_names(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``model``'s parameter names -> checkpoint names (the inverse of :func:`to_model_names`)."""
    bb = backbone_path(model) + "."
    return {BACKBONE_PREFIX + k[len(bb):] if k.startswith(bb) else k: v for k, v in sd.items()}


def _rename(names, key_mapping: dict[str, str] | None) -> dict[str, str]:
    """``{new name: checkpoint name}`` after applying ``key_mapping`` (each pattern in turn)."""
    out = {}
    for name in names:
        new = name
        for pattern, repl in (key_mapping or {}).items():
            new = re.sub(pattern, repl, new)
        out[new] = name
    return out


def _device(value: Any) -> torch.device:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value in ("disk", "meta"):
        raise UnsupportedArgumentError(f"device_map value {value!r}: offloading is not supported; moge loads every "
                                       f"weight onto one device")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise UnsupportedArgumentError(f"device_map value {value!r} is not a device") from None


def resolve_device_map(device_map: Any, model: nn.Module) -> torch.device:
    """The one device ``device_map`` puts the model on (None -> CPU); a per-module map must name modules
    of ``model``, cover every parameter and agree on one device."""
    if device_map is None:
        return torch.device("cpu")
    if not isinstance(device_map, dict):
        return _device(device_map)
    modules = dict(model.named_modules())
    unknown = sorted(k for k in device_map if k not in modules)
    if unknown:
        raise UnsupportedArgumentError(listing(f"device_map names modules {type(model).__name__} does not have",
                                               unknown))
    uncovered = [n for n, _ in model.named_parameters()
                 if not any(k == "" or n == k or n.startswith(k + ".") for k in device_map)]
    if uncovered:
        raise UnsupportedArgumentError(listing("device_map leaves parameters without a device", uncovered))
    devices = {_device(v) for v in device_map.values()}
    if len(devices) > 1:
        raise UnsupportedArgumentError(f"device_map spreads the model over {sorted(map(str, devices))}; moge's model "
                                       f"is single-device (use moge.parallel for expert parallelism)")
    return devices.pop()


def _config(cls: type, path: Path, config: Any, config_kwargs: dict[str, Any]) -> Any:
    """The transformers config: the given one, or the checkpoint's architecture (moge's reader) plus its
    transformers-level keys, updated with the config keywords of ``from_pretrained``."""
    if config is not None:
        if config_kwargs:
            raise UnsupportedArgumentError(f"{cls.__name__}.from_pretrained got both `config` and config keywords "
                                           f"{sorted(config_kwargs)}; set them on the config")
        return config
    raw = read_config_dict(path / CONFIG_NAME)
    hf_keys = {k: raw[k] for k in _HF_CONFIG_KEYS if k in raw}
    config = cls.config_class.from_moge_config(read_config(path), **hf_keys)
    for k, v in config_kwargs.items():
        setattr(config, k, v)
    config.to_moge_config()  # a bad keyword value fails here, naming the field
    return config


def _checkpoint_shapes(path: Path, moge_cfg: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint in moge's form (experts stacked), from the headers only."""
    files = weight_files(path)
    with open_shards(sorted(set(files.values()))) as handles:
        shapes = header_shapes(files, handles)
    meta = {n: torch.empty(s, device="meta") for n, s in shapes.items() if not IGNORED_RE.search(n)}
    return {n: tuple(t.shape) for n, t in from_published_state_dict(meta, moge_cfg).items()}


def load(cls: type, path: str | Path, model_args: tuple, config: Any, dtype: Any, device_map: Any,
         kwargs: dict[str, Any]) -> Any:
    """``cls.from_pretrained(path, ...)`` (see the module docstring); returns the model in eval mode, or
    ``(model, loading_info)`` with ``output_loading_info=True``."""
    output_loading_info = kwargs.pop("output_loading_info", False)
    verify = kwargs.pop("verify", True)  # moge's own: manifest SHA-256 and NaN/inf refusal on load
    key_mapping = kwargs.pop("key_mapping", None)
    attn = kwargs.pop("attn_implementation", None)
    if attn not in _ATTENTION:
        raise UnsupportedArgumentError(f"attn_implementation={attn!r}: moge's attention runs through PyTorch SDPA "
                                       f"(choose one of {list(_ATTENTION)}; output_attentions=True works with any)")
    for k in ("ignore_mismatched_sizes", "quantization_config", "gguf_file", "variant"):
        if kwargs.get(k):
            raise UnsupportedArgumentError(f"{cls.__name__}.from_pretrained does not support {k}={kwargs[k]!r}")
        kwargs.pop(k, None)
    subfolder = kwargs.get("subfolder") or ""
    for k in _IGNORED:
        kwargs.pop(k, None)
    probe = cls.config_class()
    config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(probe, k) and not callable(getattr(probe, k))}
    if model_args or kwargs:
        raise UnsupportedArgumentError(f"{cls.__name__}.from_pretrained got unsupported arguments: "
                                       f"{sorted(kwargs) + [repr(a) for a in model_args]}")
    path = Path(path) / subfolder
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a local checkpoint directory (Pangu Pro MoE checkpoints load "
                              "from local released-layout directories only)")
    config = _config(cls, path, config, config_kwargs)
    tdtype = resolve_dtype(dtype)

    if quantization_format(path) is not None:  # Ascend W8A8: the causal LM (or base model) with int8 modules
        return _load_quantized(cls, path, config, tdtype, device_map, verify, key_mapping, output_loading_info)
    # Read with the head untied, so a separate lm_head of the checkpoint is never dropped.
    moge_cfg = config.to_moge_config().replace(tie_word_embeddings=False)
    shapes = _checkpoint_shapes(path, moge_cfg)
    found = _rename(shapes, key_mapping)  # new name -> checkpoint name
    with torch.device("meta"):
        model = cls(config)
    device = resolve_device_map(device_map, model)
    ckpt_shapes = to_model_names({new: shapes[old] for new, old in found.items()}, model)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bb = backbone_path(model) + "."
    tied = bool(config.tie_word_embeddings) and "lm_head.weight" in want
    missing = sorted(set(want) - set(ckpt_shapes) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(ckpt_shapes) - set(want))
    bad = [f"{n}: expected {list(want[n])}, found {list(ckpt_shapes[n])}" for n in sorted(want)
           if n in ckpt_shapes and ckpt_shapes[n] != want[n]]
    if bad:
        raise CheckpointError(listing(f"tensors with the wrong shape in {path}", bad, limit=6))
    # The backbone and a causal LM's head are the model; only other heads may start from scratch.
    lost = [n for n in missing if n.startswith(bb) or n == "lm_head.weight"]
    if lost:
        raise CheckpointError(listing(f"missing tensors in {path}", [n.replace(bb, BACKBONE_PREFIX, 1) for n in lost]))

    read = load_state_dict(path, moge_cfg, tdtype, device, verify=verify)
    sd = to_model_names({new: read.pop(old) for new, old in found.items()}, model)
    for n in unexpected:
        sd.pop(n, None)
    if tied and "lm_head.weight" in sd:
        head, embed = sd["lm_head.weight"], sd[bb + "embed_tokens.weight"]
        if torch.equal(head, embed):
            sd.pop("lm_head.weight")
        else:
            warnings.warn(f"tie_word_embeddings=True, but {path} holds an lm_head.weight that differs from the "
                          f"embedding: keeping the checkpoint's head untied (config.tie_word_embeddings=False)",
                          stacklevel=3)
            config.tie_word_embeddings = False
            with torch.device("meta"):
                model = cls(config)
            tied = False
    model.load_state_dict(sd, strict=False, assign=True)
    _finish(model, config, missing, tied, device, next(iter(sd.values())).dtype)
    if missing or unexpected:
        warnings.warn(f"loading {type(model).__name__} from {path}: "
                      + "; ".join(x for x in (missing and listing("newly initialised", missing),
                                              unexpected and listing("unused checkpoint tensors", unexpected)) if x),
                      stacklevel=3)
    _load_generation_config(model, path)
    model.config.name_or_path = str(path)
    model.config.dtype = next(model.parameters()).dtype
    model.eval()
    if output_loading_info:
        info = {"missing_keys": set(missing), "unexpected_keys": set(unexpected), "mismatched_keys": set(),
                "error_msgs": []}
        return model, info
    return model


def _load_quantized(cls: type, path: Path, config: Any, dtype: torch.dtype | None, device_map: Any, verify: bool,
                    key_mapping: Any, output_loading_info: bool) -> Any:
    """A quantized directory through :func:`moge.checkpoint.load_into` (which installs the int8 modules):
    only classes whose parameter names are the checkpoint's own (the causal LM) can take it."""
    if key_mapping:
        raise UnsupportedArgumentError("key_mapping is not supported for quantized (W8A8) checkpoints")
    with torch.device("meta"):
        model = cls(config)
    if backbone_path(model) != "model" or not hasattr(model, "lm_head"):
        raise UnsupportedArgumentError(f"{cls.__name__} cannot load the quantized checkpoint {path}: quantized "
                                       f"checkpoints load into the causal LM (AutoModelForCausalLM)")
    device = resolve_device_map(device_map, model)
    load_into(model, path, config.to_moge_config(), dtype, device, verify=verify)
    _load_generation_config(model, path)
    model.config.name_or_path = str(path)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model


def _finish(model: nn.Module, config: Any, missing: list[str], tied: bool, device: torch.device,
            dtype: torch.dtype) -> None:
    """Materialise and initialise the modules the checkpoint did not fill, rebuild RoPE, tie the head."""
    mods = dict(model.named_modules())
    for name in {n.rpartition(".")[0] for n in missing}:
        mod = mods[name]  # a head module the checkpoint has none of (the backbone is never partial)
        mod.to_empty(device=device, recurse=False).to(dtype)
        init_module(mod, config.initializer_range)
    backbone = mods[backbone_path(model)]
    moge_cfg = config.to_moge_config()
    # Non-persistent buffer: rebuilt from the config on the target device, always float32.
    backbone.rotary = RotaryEmbedding(moge_cfg.resolved_head_dim, moge_cfg.rope_theta).to(device)
    if tied:
        model.lm_head.weight = backbone.embed_tokens.weight


def _load_generation_config(model: Any, path: Path) -> None:
    """The directory's ``generation_config.json`` as ``model.generation_config`` (when the model generates)."""
    if not (model.can_generate() and (path / "generation_config.json").is_file()):
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'generation_config.json'} is not a valid generation config: {e}") from None
