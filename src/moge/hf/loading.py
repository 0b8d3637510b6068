"""``from_pretrained`` / ``save_pretrained`` of the transformers wrapper classes: moge's memory-mapped
loader (:mod:`moge.checkpoint`) behind transformers' keywords and loading contract.

A checkpoint's ``model.*`` tensors are the backbone: the base model :class:`~moge.hf.PanguProMoEModel`,
``model`` in the causal LM and the heads (the same names as the checkpoint's), the model itself when the
base model is loaded alone (its names lack the ``model.`` prefix, as transformers' base models' do).
As in transformers, keys and shapes are loose: a tensor the checkpoint lacks is initialised (by the
model's own rule) and reported (transformers' own load report), a tensor the class does not use is
skipped and reported, and a tensor of another shape raises :class:`ShapeMismatchError` unless
``ignore_mismatched_sizes=True`` re-initialises it (``output_loading_info=True`` returns the report). Integrity stays strict: with
``verify`` (the default) a training manifest's SHA-256 is checked and NaN/inf tensors are refused
(:func:`moge.checkpoint.load_state_dict`), and reads stay confined to the directory.

Keywords: ``dtype``/``torch_dtype``, ``device_map`` (one device, also as a per-module map whose modules
all go to that device; several devices are refused: the model is single-device), ``tp_plan="auto"``
(or ``distributed_config``: tensor parallelism through transformers under torchrun, along the class's
``_tp_plan``), ``key_mapping`` (regex -> replacement on the checkpoint's tensor names as moge reads them,
experts already stacked), ``output_loading_info``, ``ignore_mismatched_sizes``, ``state_dict`` (with
``path`` None and ``config``), ``attn_implementation`` (``sdpa``/``eager``), ``tqdm_class``
(transformers uses it for Hub downloads only; moge reads local directories), config attributes
(``output_router_logits=True``, ``num_labels=3``, ``tie_word_embeddings=...``) and moge's ``verify``.
Anything else is refused by name. On a CPU the loaded weights go on transparent huge pages, as
``load_pretrained`` puts them (:mod:`moge.memory`).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DistributedConfig, GenerationConfig
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

from ..checkpoint import CONFIG_NAME, CheckpointError, load_into, load_state_dict, read_config, resolve_dtype
from ..checkpoint.io import header_shapes, listing, open_shards, weight_files
from ..checkpoint.layout import IGNORED_RE, from_published_state_dict, quantization_format
from ..config import read_config_dict
from ..errors import MoGEError
from ..memory import move_to_huge_pages
from ..experts import StackedExperts
from ..model import Backbone, RotaryEmbedding, init_module
from .forward import UnsupportedArgumentError

# Only meaningful for Hub downloads or for transformers' own loader.
_IGNORED = {"trust_remote_code", "low_cpu_mem_usage", "local_files_only", "use_safetensors", "cache_dir",
            "force_download", "proxies", "revision", "token", "_from_auto", "_from_pipeline", "adapter_kwargs",
            "tqdm_class", "subfolder"}
# transformers-level config.json keys kept next to the architecture moge reads.
_HF_CONFIG_KEYS = ("use_cache", "output_router_logits", "id2label", "label2id", "problem_type")
_ATTENTION = (None, "sdpa", "eager")  # moge.model.attention.ATTENTION_KERNELS
BACKBONE_PREFIX = "model."
_REPORT_FIELDS = {f.name for f in fields(LoadStateDictInfo)}


def backbone_path(model: nn.Module) -> str:
    """Qualified name of the backbone (:class:`~moge.model.Backbone`) in ``model``: ``"model"``, or ``""``
    for the base model itself."""
    return next(name for name, mod in model.named_modules() if isinstance(mod, Backbone))


def backbone_prefix(model: nn.Module) -> str:
    """The prefix of the backbone's parameter names in ``model``: ``"model."``, or ``""`` for the base model."""
    path = backbone_path(model)
    return path + "." if path else ""


def to_model_names(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint names (backbone under ``model.``) -> ``model``'s parameter names."""
    bb = backbone_prefix(model)
    return {bb + k[len(BACKBONE_PREFIX):] if k.startswith(BACKBONE_PREFIX) else k: v for k, v in sd.items()}


def to_checkpoint_names(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``model``'s parameter names -> checkpoint names (the inverse of :func:`to_model_names`)."""
    bb = backbone_prefix(model)
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


class ShapeMismatchError(CheckpointError, RuntimeError):
    """Checkpoint tensors whose shapes differ from the model's; ``ignore_mismatched_sizes=True`` re-initialises
    them instead (a classifier re-headed with another ``num_labels``)."""


class MetaDeviceContextError(MoGEError, RuntimeError):
    """``from_pretrained`` called inside a ``with torch.device("meta")`` block: no weights could be read into it."""


@dataclass
class LoadOptions:
    """The ``from_pretrained`` keywords this loader acts on (the rest are config attributes or refused)."""
    output_loading_info: bool = False
    verify: bool = True  # moge's own: manifest SHA-256 and NaN/inf refusal on load
    key_mapping: dict[str, str] | None = None
    ignore_mismatched_sizes: bool = False
    state_dict: dict[str, Tensor] | None = None
    distributed_config: Any = None  # transformers' DistributedConfig (tensor parallelism), or None

    @classmethod
    def pop(cls, kwargs: dict[str, Any]) -> "LoadOptions":
        """Take the options out of ``kwargs``; ``tp_plan``/``tp_size`` become a ``DistributedConfig``."""
        opts = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in cls.__dataclass_fields__})
        tp = {k: v for k in ("tp_plan", "tp_size") if (v := kwargs.pop(k, None)) is not None}
        if tp and opts.distributed_config is not None:
            raise UnsupportedArgumentError("pass tensor parallelism once: as distributed_config or as tp_plan/tp_size")
        if tp:
            opts.distributed_config = DistributedConfig(**tp)
        if kwargs.pop("device_mesh", None) is not None:
            raise UnsupportedArgumentError("device_mesh is not supported; pass tp_plan='auto' (or a "
                                           "DistributedConfig) and launch with torchrun")
        return opts


def load(cls: type, path: str | Path | None, model_args: tuple, config: Any, dtype: Any, device_map: Any,
         kwargs: dict[str, Any]) -> Any:
    """``cls.from_pretrained(path, ...)`` (see the module docstring); returns the model in eval mode, or
    ``(model, loading_info)`` with ``output_loading_info=True``. ``path=None`` with ``config`` and
    ``state_dict`` builds the model from that state dict (transformers' contract)."""
    if torch.empty(0).device.type == "meta":
        raise MetaDeviceContextError("You are using `from_pretrained` with a meta device context manager: the "
                                     "weights cannot be loaded into meta tensors; call it outside the "
                                     "`with torch.device('meta')` block")
    opts = LoadOptions.pop(kwargs)
    attn = kwargs.pop("attn_implementation", None)
    if attn not in _ATTENTION:
        raise UnsupportedArgumentError(f"attn_implementation={attn!r}: moge's attention runs through PyTorch SDPA "
                                       f"or written out (eager); choose one of {list(_ATTENTION)}")
    for k in ("quantization_config", "gguf_file", "variant"):
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
    if path is None:
        model, info = _from_state_dict(cls, config, config_kwargs, opts, resolve_dtype(dtype), attn)
    else:
        if opts.state_dict is not None:
            raise UnsupportedArgumentError("pass either a checkpoint directory or state_dict= (with path None), "
                                           "not both")
        path = Path(path).expanduser() / subfolder
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a local checkpoint directory (Pangu Pro MoE checkpoints load "
                                  "from local released-layout directories only)")
        config = _config(cls, path, config, config_kwargs)
        set_attention(config, attn)
        model, info = _from_directory(cls, path, config, resolve_dtype(dtype), device_map, opts)
        move_to_huge_pages(model)  # as load_pretrained: CPU weights on huge pages (moge.memory)
        _load_generation_config(model, path)
        model.config.name_or_path = str(path)
    model.eval()
    model = _distribute(cls, model, opts.distributed_config)
    return (model, info) if opts.output_loading_info else model


def set_attention(config: Any, attn: str | None) -> None:
    """Record the attention implementation asked for (None keeps the config's, SDPA by default)."""
    if attn is not None:
        config._attn_implementation = attn


def _loading_info(missing=(), unexpected=(), mismatched=()) -> dict[str, Any]:
    """transformers' ``output_loading_info`` dict: sets of names (mismatched: ``(name, found, expected)``)."""
    return {"missing_keys": set(missing), "unexpected_keys": set(unexpected), "mismatched_keys": set(mismatched),
            "error_msgs": []}


def _from_state_dict(cls: type, config: Any, config_kwargs: dict[str, Any], opts: LoadOptions,
                     dtype: torch.dtype | None, attn: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """``from_pretrained(None, config=..., state_dict=...)``: an initialised model updated from the state dict
    (our names or the released layout); tensors it lacks keep their initialisation and are reported."""
    if config is None or opts.state_dict is None:
        raise UnsupportedArgumentError(f"{cls.__name__}.from_pretrained(None, ...) needs both config= and state_dict=")
    for k, v in config_kwargs.items():
        setattr(config, k, v)
    set_attention(config, attn)
    model = cls(config)
    result = model.load_state_dict(opts.state_dict, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model, _loading_info(result.missing_keys, result.unexpected_keys)


def _compare(want: dict[str, tuple], found: dict[str, tuple], tied: bool, path: Path,
             ignore_mismatched_sizes: bool) -> tuple[list[str], list[str], list[tuple]]:
    """Missing, unexpected and mis-shaped tensors of a checkpoint against the model (names in the model's form)."""
    missing = sorted(set(want) - set(found) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(found) - set(want))
    mismatched = [(n, found[n], want[n]) for n in sorted(want) if n in found and found[n] != want[n]]
    if mismatched and not ignore_mismatched_sizes:
        raise ShapeMismatchError(listing(f"tensors with the wrong shape in {path} (ignore_mismatched_sizes=True "
                                         f"re-initialises them)",
                                         [f"{n}: expected {list(w)}, found {list(f)}" for n, f, w in mismatched],
                                         limit=6))
    return missing, unexpected, mismatched


def _from_directory(cls: type, path: Path, config: Any, dtype: torch.dtype | None, device_map: Any,
                    opts: LoadOptions) -> tuple[nn.Module, dict[str, Any]]:
    """A released-layout directory, memory-mapped onto a model built on the meta device. Tensors the
    checkpoint lacks (or, with ``ignore_mismatched_sizes``, holds in another shape) are initialised as
    the model's own initialisation would and reported; integrity checks (``verify``) stay on."""
    if quantization_format(path) is not None:  # Ascend W8A8: the causal LM (or base model) with int8 modules
        model = _load_quantized(cls, path, config, dtype, device_map, opts.verify, opts.key_mapping)
        return model, _loading_info()
    # Read with the head untied, so a separate lm_head of the checkpoint is never dropped.
    moge_cfg = config.to_moge_config().replace(tie_word_embeddings=False)
    shapes = _checkpoint_shapes(path, moge_cfg)
    found = _rename(shapes, opts.key_mapping)  # new name -> checkpoint name
    with torch.device("meta"):
        model = cls(config)
    device = resolve_device_map(device_map, model)
    ckpt_shapes = to_model_names({new: shapes[old] for new, old in found.items()}, model)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bb = backbone_path(model)
    tied = bool(config.tie_word_embeddings) and "lm_head.weight" in want
    missing, unexpected, mismatched = _compare(want, ckpt_shapes, tied, path, opts.ignore_mismatched_sizes)

    # Tensors the class does not use are not read (a stored tensor is skipped, not judged); the files
    # holding them are still verified.
    stored_as = to_model_names(dict(found), model)  # model name -> the name moge reads it under
    skip = {stored_as[n] for n in unexpected} & set(weight_files(path))
    read = load_state_dict(path, moge_cfg, dtype, device, verify=opts.verify, skip=skip)
    sd = to_model_names({new: read.pop(old) for new, old in found.items() if old in read}, model)
    for n in unexpected + [m[0] for m in mismatched]:
        sd.pop(n, None)
    if tied and "lm_head.weight" in sd:
        head, embed = sd["lm_head.weight"], sd[_join(bb, "embed_tokens.weight")]
        if torch.equal(head, embed):
            sd.pop("lm_head.weight")
        else:
            warnings.warn(f"tie_word_embeddings=True, but {path} holds an lm_head.weight that differs from the "
                          f"embedding: keeping the checkpoint's head untied (config.tie_word_embeddings=False)",
                          stacklevel=4)
            config.tie_word_embeddings = False
            with torch.device("meta"):
                model = cls(config)
            tied = False
    fresh = missing + [m[0] for m in mismatched]
    stored_dtype = next(iter(sd.values())).dtype if sd else torch.get_default_dtype()
    sd.update(initialised(model, fresh, config.initializer_range, device, dtype or stored_dtype))
    model.load_state_dict(sd, strict=False, assign=True)
    _finish(model, config, tied, device)
    _report(model, path, missing, unexpected, mismatched)
    model.config.dtype = next(model.parameters()).dtype
    return model, _loading_info(missing, unexpected, mismatched)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def initialised(model: nn.Module, names: list[str], std: float, device: torch.device,
                dtype: torch.dtype) -> dict[str, Tensor]:
    """Freshly initialised tensors for ``names`` of a meta-device ``model``: each owning module is copied
    (still on the meta device), materialised and initialised by :func:`moge.model.init_module`, the same
    rule a new model follows, so a partial module never overwrites the tensors the checkpoint did hold."""
    out: dict[str, Tensor] = {}
    by_owner: dict[str, list[str]] = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        by_owner.setdefault(owner, []).append(leaf)
    for owner, leaves in by_owner.items():
        mod = copy.deepcopy(model.get_submodule(owner)).to_empty(device=device)
        for m in mod.modules():
            init_module(m, std)
            if isinstance(m, StackedExperts) and m is mod:  # init_module reaches experts through their MoGELayer
                m.reset_parameters(std)
        params = dict(mod.named_parameters(recurse=False))
        for leaf in leaves:
            t = params[leaf].detach()
            out[_join(owner, leaf)] = t.to(dtype) if t.is_floating_point() else t
    return out


def _report(model: nn.Module, path: Path, missing: list[str], unexpected: list[str], mismatched: list[tuple]) -> None:
    """transformers' own load report of what was initialised, skipped or re-initialised: its table, as a
    warning on its ``transformers.modeling_utils`` logger, where transformers' loader puts it."""
    values = {"missing_keys": set(missing), "unexpected_keys": set(unexpected), "mismatched_keys": set(mismatched),
              "error_msgs": [], "conversion_errors": {}, "skipped_pp_keys": set()}
    # Only the fields this transformers version's report has (5.23 lacks some of 5.24's).
    info = LoadStateDictInfo(**{k: v for k, v in values.items() if k in _REPORT_FIELDS})
    log_state_dict_report(model, str(path), True, info, logger=hf_logging.get_logger("transformers.modeling_utils"))


def _distribute(cls: type, model: nn.Module, distributed_config: Any) -> nn.Module:
    """Tensor parallelism by transformers' own machinery: its device mesh (``torch.distributed`` initialised
    from torchrun's environment) and its sharding of the loaded weights along the class's ``_tp_plan``."""
    if distributed_config is None:
        return model
    distributed_config, _, mesh = cls.prepare_distribute_model(distributed_config)
    return cls.maybe_distribute_model(model, distributed_config, mesh)


def _load_quantized(cls: type, path: Path, config: Any, dtype: torch.dtype | None, device_map: Any, verify: bool,
                    key_mapping: Any) -> nn.Module:
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
    return model


def _finish(model: nn.Module, config: Any, tied: bool, device: torch.device) -> None:
    """Rebuild RoPE's table on the target device and tie the head."""
    backbone = model.get_submodule(backbone_path(model))
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
