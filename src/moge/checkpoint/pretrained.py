"""Load and save whole models in the released layout: ``config.json`` plus safetensors shards.

Loading is memory-mapped (``safetensors.safe_open``) into a model built on the meta device, so the
weights are materialised once, directly in the requested dtype and device, and every name and shape
is checked against the model before any data is read. Saving takes a config and a state dict
(:func:`save_pretrained`), or a model (:func:`save_model`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, MoGEConfig, read_config_dict
from ..errors import ArgumentTypeError
from ..memory import move_to_huge_pages
from ..model import MoGEForCausalLM
from .hf_files import write_companions
from .io import (CheckpointError, confined, header_shapes, listing, open_shards, save_shards, to_dtype_device,
                 weight_files, writable_dir, write_json, writing)
from .layout import (QUANT_DESCRIPTION_NAME, check_names_and_shapes, check_shared_heads, config_from_dict,
                     config_quantization, group_expert_names, mtp_native_name, published_shapes, quantization_format,
                     released_config_dict, shared_head_names, stack_experts, to_published_state_dict)
from .quantized import load_quantized_into, save_quantized
from .reading import (CONFIG_NAME, FLOAT_DTYPES, QUANT_DTYPES, assign_loaded, check_tokenizer_file, resolve_device,
                      resolve_dtype, tensor_reader, verify_against_manifest)
from .weight_only import load_weight_only_into, save_weight_only


def unwrap_model(model: Any) -> Any:
    """The plain module inside ``torch.compile`` (``_orig_mod``) and DDP / FSDP-style (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(getattr(model, "module", None), torch.nn.Module) \
                and not hasattr(model, "lm_head"):
            inner = model.module
        if inner is None:
            return model
        model = inner


def model_config(model: Any) -> MoGEConfig:
    """The :class:`MoGEConfig` of a native model or of the transformers wrapper (:mod:`moge.hf`)."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, MoGEConfig):
        return cfg
    if cfg is not None and hasattr(cfg, "to_moge_config"):
        return cfg.to_moge_config()
    raise CheckpointError(f"cannot find a MoGEConfig on {type(model).__name__}")


def refuse_quantized(directory: Path) -> None:
    """:class:`CheckpointError` naming the format when ``directory`` holds a quantized checkpoint (for
    readers of float state dicts; whole models load it through :func:`load_into`)."""
    fmt = quantization_format(directory)
    if fmt is not None:
        raise CheckpointError(f"{directory} is a quantized checkpoint in the {fmt} format, which has no float "
                              f"state dict; load it as a model (load_pretrained) instead")


def read_config(directory: str | Path) -> MoGEConfig:
    """The :class:`MoGEConfig` of a checkpoint directory (or of a ``config.json`` path).

    A released config without a group count reads groups = ``num_experts_per_tok``; missing
    pad/bos/eos come from the directory's tokenizer (see :func:`.layout.config_from_dict`). A quantized
    checkpoint has an ordinary config.
    """
    if not isinstance(directory, (str, Path)):
        raise ArgumentTypeError(f"checkpoint path must be a str or Path, got {type(directory).__name__}")
    path = Path(directory).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_dir():
        path = confined(path, CONFIG_NAME)
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} at {path}")
    try:
        d = read_config_dict(path)
    except ConfigError as e:  # an unreadable file is a checkpoint problem; bad field values stay ConfigError
        raise CheckpointError(str(e)) from None
    return config_from_dict(d, path.parent)


def load_state_dict(directory: str | Path, config: MoGEConfig | None = None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu",
                    expected: Mapping[str, tuple[int, ...]] | None = None, verify: bool = True,
                    skip: Collection[str] = ()) -> dict[str, Tensor]:
    """Read a released-layout directory into our state-dict form (experts stacked).

    Tensors are read memory-mapped, cast to ``dtype`` (None keeps the stored dtype) and placed on
    ``device``. With ``expected`` (native name -> shape, e.g. from a meta-device model) the checkpoint
    is checked before any data is read: missing, unexpected or mis-shaped tensors raise
    :class:`CheckpointError` naming them, with expected and found shapes. With ``verify`` (the
    default) a directory with a training manifest has its config, index and shards checked against
    it (SHA-256, streamed) before anything is read, and every tensor is refused, by name, if it holds
    NaN or inf; see ``docs/checkpoints.md`` for the cost. ``skip``: stored tensor names not to read
    (tensors a caller has no use for); their files are still verified.
    """
    directory = Path(directory).expanduser()
    dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    refuse_quantized(directory)
    config = config if config is not None else read_config(directory)
    files = weight_files(directory)
    if verify:
        verify_against_manifest(directory, set(files.values()))
    files = {n: f for n, f in files.items() if n not in skip}
    copies = [n for n in shared_head_names(config) if n in files]  # MTP head copies: checked, not loaded
    plain, experts = group_expert_names(n for n in files if n not in copies)
    wanted = {n: files[n] for n in [*plain, *copies]} | {n: files[n] for parts in experts.values()
                                                           for n in parts.values()}
    out: dict[str, Tensor] = {}
    with open_shards(sorted(set(wanted.values()))) as handles:
        shapes = header_shapes(wanted, handles)  # validate everything before materialising anything
        quant = [n for n, p in wanted.items() if handles[p].get_slice(n).get_dtype() in QUANT_DTYPES]
        if quant:
            raise CheckpointError(f"{directory} holds integer (quantized) weights, e.g. {sorted(quant)[0]}, but no "
                                  f"{QUANT_DESCRIPTION_NAME} saying how they are quantized")
        others = sorted(f"{n} ({handles[p].get_slice(n).get_dtype()})" for n, p in wanted.items()
                        if handles[p].get_slice(n).get_dtype() not in FLOAT_DTYPES)
        if others:
            raise CheckpointError(listing(f"{directory} holds tensors that are not floating point (moge loads "
                                          f"F32/F16/BF16/F64 weights)", others, limit=4))
        if expected is not None:
            # a tied head may be stored redundantly
            check_names_and_shapes(str(directory), published_shapes(expected, config), shapes,
                                   tolerated=(["lm_head.weight"] if config.tie_word_embeddings else []) + copies)

        read = tensor_reader(handles, wanted, verify)

        for name in plain:
            if not (config.tie_word_embeddings and name == "lm_head.weight"):
                out[name] = to_dtype_device(read(name), dtype, dev)
        for prefix, parts in experts.items():
            out.update(stack_experts(prefix, parts, config.num_experts, read, dtype, dev,
                                     f"missing tensors in {directory}"))
        head = out.get("lm_head.weight", out.get("model.embed_tokens.weight"))
        if copies and head is not None:
            check_shared_heads({n: read(n) for n in copies}, head, str(directory))
    return {mtp_native_name(k, config.num_hidden_layers): v for k, v in out.items()}


def build_on_meta(config: MoGEConfig):
    """A :class:`~moge.model.MoGEForCausalLM` on the meta device (no memory), to load weights into."""
    with torch.device("meta"):
        return MoGEForCausalLM(config)


def load_into(module: torch.nn.Module, directory: str | Path, config: MoGEConfig,
              dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
              verify: bool = True) -> torch.nn.Module:
    """Load a checkpoint into ``module`` (built on the meta device, parameter names as in the checkpoint
    with stacked experts) by assigning the loaded tensors; re-creates the RoPE buffer and re-ties.
    ``verify``: see :func:`load_state_dict`. An Ascend W8A8 directory installs its int8 modules first
    (:func:`.quantized.load_quantized_into`), a weight-only one (compressed-tensors pack-quantized) its int8 /
    int4 modules (:func:`.weight_only.load_weight_only_into`)."""
    if quantization_format(directory) is not None:
        qc = config_quantization(directory)
        if qc is None:  # the Ascend description
            return load_quantized_into(module, directory, config, resolve_dtype(dtype), device, verify)
        if (Path(directory) / QUANT_DESCRIPTION_NAME).is_file():
            raise CheckpointError(f"{directory} has both {QUANT_DESCRIPTION_NAME} (Ascend W8A8) and a "
                                  f"quantization_config in config.json; a checkpoint is in one quantized format")
        return load_weight_only_into(module, directory, config, qc, resolve_dtype(dtype), device, verify)

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sd = load_state_dict(directory, config, dtype, device, expected=expected, verify=verify)
    return assign_loaded(module, sd, config, device)


def load_pretrained(directory: str | Path, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", verify: bool = True, huge_pages: bool = True):
    """Load a released-layout checkpoint directory into a :class:`~moge.model.MoGEForCausalLM`.

    The model is built on the meta device and the memory-mapped tensors are assigned to it, cast to
    ``dtype`` (``None``/``"auto"`` keeps the stored dtype) on ``device``; no float32 copy of the whole
    model is made. An Ascend W8A8 directory gives the int8 model, a weight-only one the int8 / int4 model
    (scales stay float32). Missing /
    unexpected / mis-shaped tensors, unreadable files and a missing ``config.json`` raise :class:`CheckpointError` naming them. ``verify`` (default True): a directory
    with a training manifest is checked against it (SHA-256) and tensors holding NaN/inf are refused
    by name (see :func:`load_state_dict`). ``huge_pages`` (default True): on a CPU the weights then
    move to transparent huge pages, where a decode step streams them faster (:mod:`moge.memory`).
    Returns the model in eval mode.
    """
    if not isinstance(directory, (str, Path)):
        raise ArgumentTypeError(f"load_pretrained(directory) must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist" if not directory.exists()
                              else f"{directory} is not a directory")
    resolve_dtype(dtype)
    resolve_device(device)  # argument errors before any file is read
    config = read_config(directory)
    model = load_into(build_on_meta(config), directory, config, dtype, device, verify)
    if huge_pages:
        move_to_huge_pages(model)  # CPU tensors only; a no-op elsewhere
    return model.eval()


def normalise_names(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrappers' prefixes (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def save_pretrained(directory: str | Path, config: MoGEConfig, state_dict: Mapping[str, Tensor],
                    max_shard_size: int | str = "2GB", tokenizer_file: str | Path | None = None,
                    progress: bool = False, config_overrides: Mapping[str, Any] | None = None,
                    generation_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``state_dict`` (our names, experts stacked) under ``config`` in the released layout.

    Weights first (``model.safetensors``, or shards plus ``model.safetensors.index.json``), then
    ``config.json`` (:func:`.layout.released_config_dict`) and ``generation_config.json`` (the special
    ids, updated with ``generation_config``), then optionally ``tokenizer.json`` with the tokenizer
    files transformers reads (see :mod:`.hf_files`); each file atomically, so a directory with a config
    always has a complete set of weights. Returns the directory.
    A state dict of int8 modules (:mod:`moge.quant`) is written in the Ascend W8A8 layout instead
    (:func:`.quantized.save_quantized`), one of weight-only modules in compressed-tensors' pack-quantized
    layout (:func:`.weight_only.save_weight_only`).
    """
    if isinstance(directory, torch.nn.Module) or not isinstance(config, MoGEConfig):
        raise TypeError("save_pretrained(directory, config, state_dict): to save a model object use "
                        "moge.checkpoint.save_model(model, directory)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {directory}: it exists and is not a directory")
    if tokenizer_file is not None:
        check_tokenizer_file(tokenizer_file)  # before anything is written
    state_dict = normalise_names(state_dict)
    if any(k.endswith(".qweight") for k in state_dict):  # weight-only int8 / int4: compressed-tensors' layout
        if any(k.endswith(".weight") and t.dtype == torch.int8 for k, t in state_dict.items()):
            raise CheckpointError("the state dict mixes W8A8 and weight-only modules; a checkpoint holds one kind")
        return save_weight_only(directory, config, state_dict, max_shard_size, tokenizer_file, progress,
                                config_overrides)
    if any(t.dtype == torch.int8 for t in state_dict.values()):  # int8 modules: the Ascend W8A8 layout
        return save_quantized(directory, config, state_dict, max_shard_size, tokenizer_file, progress,
                              config_overrides)
    writable_dir(directory, "checkpoint directory")
    published = to_published_state_dict(state_dict, config)
    with writing("checkpoint", directory):
        save_shards(published, directory, max_shard_size, progress)
        for stale in (QUANT_DESCRIPTION_NAME, "moge_quantization.json"):  # a float save over a quantized dir
            if (directory / stale).exists():
                (directory / stale).unlink()
        dtypes = {t.dtype for t in published.values() if t.is_floating_point()}
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
        write_json(directory / CONFIG_NAME, released_config_dict(config, dtype, config_overrides))
        write_companions(directory, config, tokenizer_file, generation_config)
    return directory


def save_model(model: Any, directory: str | Path, max_shard_size: int | str = "2GB",
               tokenizer_file: str | Path | None = None, progress: bool = False) -> Path:
    """:func:`save_pretrained` of a model object: :class:`~moge.model.MoGEForCausalLM` or the
    transformers wrapper, also inside ``torch.compile`` / DDP wrappers."""
    model = unwrap_model(model)
    overrides = None
    hf_cfg = getattr(model, "config", None)
    if hf_cfg is not None and not isinstance(hf_cfg, MoGEConfig):
        overrides = {k: getattr(hf_cfg, k) for k in ("use_cache", "output_router_logits") if hasattr(hf_cfg, k)}
    return save_pretrained(directory, model_config(model), model.state_dict(), max_shard_size, tokenizer_file,
                           progress, overrides)

