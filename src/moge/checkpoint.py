"""Convert checkpoints to the published Pangu Pro MoE layout (re-shard, change dtype, import a state dict).

``moge convert SRC DST``: SRC is a checkpoint directory in the published layout (``config.json`` plus
safetensors shards) or a single state-dict file of :class:`MoGEForCausalLM` (``.safetensors``, or ``.pt``
read with ``torch.load(weights_only=True)``; stacked or per-expert names) together with ``--config`` /
``--preset``. DST is written in the published layout (spec section 5).

The published layout stores every routed expert as its own three matrices
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``); the model keeps them stacked
(``experts.gate_up_proj [N,2F,H]`` with rows ``:F`` the gate and ``F:`` the up projection,
``experts.down_proj [N,H,F]``). :func:`to_published_state_dict` and :func:`from_published_state_dict`
go between the two. Loading is memory-mapped (``safetensors.safe_open``) into a model built on the meta
device, so the weights are materialised once, directly in the requested dtype and device.

Shape legend
    N  routed experts   F  expert intermediate size   H  hidden size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, MoGEConfig, read_config_dict
from .errors import MoGEError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
_PER_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_STACKED_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up|down)_proj$")
# Buffers some exporters write that carry no learned state (spec section 5: ignored on load).
_IGNORED_RE = re.compile(r"(^|\.)(rotary_emb|rotary)\.inv_freq$|(^|\.)inv_freq$")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(MoGEError):
    """A checkpoint directory or file that cannot be read or written; the message names the file or tensor."""


# ---- helpers -------------------------------------------------------------------------------------

def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``"auto"`` -> None (keep the stored dtype); a name or ``torch.dtype`` -> that dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        if dtype in _DTYPES:
            return _DTYPES[dtype]
    raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")


def parse_size(size: int | str) -> int:
    """Bytes from ``int`` or a string like ``"2GB"``, ``"500MB"``, ``"10KB"``, ``"1GiB"`` (GB = 10^9)."""
    if isinstance(size, int):
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


def atomic_write(path: Path, write_fn) -> None:
    """Write ``path`` through a temporary file in the same directory, fsync it, then ``os.replace``.

    A reader (or a crash) never sees a half-written file: either the old file or the complete new one.
    """
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


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, write)


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


def read_config(directory: str | Path) -> MoGEConfig:
    """The :class:`MoGEConfig` of a checkpoint directory (a published config without ``num_groups``
    reads groups = ``num_experts_per_tok``)."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} at {path}")
    try:
        d = read_config_dict(path)
    except ConfigError as e:  # an unreadable file is a checkpoint problem; bad field values stay ConfigError
        raise CheckpointError(str(e)) from None
    return MoGEConfig.from_dict(d)


# ---- state-dict layout conversion ---------------------------------------------------------------

def to_published_state_dict(state_dict: Mapping[str, Tensor], config: MoGEConfig | None = None) -> dict[str, Tensor]:
    """Our state dict (stacked experts) -> the published tensor names (one entry per expert matrix).

    Stacked ``experts.gate_up_proj [N,2F,H]`` becomes ``experts.{e}.gate_proj.weight`` (rows ``:F``) and
    ``experts.{e}.up_proj.weight`` (rows ``F:``); ``experts.down_proj [N,H,F]`` becomes
    ``experts.{e}.down_proj.weight``. Entries are views (no copy); RoPE buffers are dropped, and with
    ``config.tie_word_embeddings`` so is ``lm_head.weight`` (it is the embedding).
    """
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        if _IGNORED_RE.search(name):
            continue
        if config is not None and config.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _STACKED_RE.match(name)
        if m is None:
            out[name] = t
            continue
        prefix = m.group("prefix")
        if m.group("proj") == "gate_up":
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :f]
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, f:]
        else:
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
    return out


def _published_names(native_shapes: Mapping[str, torch.Size], tie: bool) -> dict[str, tuple[int, ...]]:
    """Expected published names and shapes from the native parameter shapes."""
    fake = {k: torch.empty(s, device="meta") for k, s in native_shapes.items()}
    pub = to_published_state_dict(fake)
    if tie:
        pub.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in pub.items()}


def from_published_state_dict(state_dict: Mapping[str, Tensor], config: MoGEConfig | None = None,
                              dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Published tensor names -> our state dict (experts stacked into ``gate_up_proj`` / ``down_proj``).

    Every layer's experts must be complete (``0..N-1``, with gate, up and down each); a gap raises
    :class:`CheckpointError` naming the missing tensor. ``dtype`` converts while stacking, so only one
    layer's experts are copied at a time. RoPE buffers are dropped.
    """
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[tuple[int, str], Tensor]] = {}
    for name, t in state_dict.items():
        if _IGNORED_RE.search(name):
            continue
        m = _PER_EXPERT_RE.match(name)
        if m is None:
            out[name] = t if dtype is None else t.to(dtype)
            continue
        experts.setdefault(m.group("prefix"), {})[(int(m.group("e")), m.group("proj"))] = t
    for prefix, parts in experts.items():
        n = config.num_experts if config is not None else 1 + max(e for e, _ in parts)
        extra = [f"{prefix}.{e}.{p}_proj.weight" for e, p in parts if e >= n]
        if extra:
            raise CheckpointError(_listing(f"unexpected expert tensors (num_experts={n})", extra))
        out.update(_stack_experts(prefix, parts, n, lambda t: t, dtype, None, "missing expert tensors"))
    return out


def _stack_experts(prefix: str, parts: Mapping[tuple[int, str], Any], n: int, read: Callable[[Any], Tensor],
                   dtype: torch.dtype | None, device: torch.device | None, missing_label: str) -> dict[str, Tensor]:
    """Stack one layer's per-expert matrices into ``{prefix}.gate_up_proj [N,2F,H]`` / ``down_proj [N,H,F]``.

    ``parts`` maps ``(expert, "gate"|"up"|"down")`` to whatever ``read`` turns into a tensor; tensors are
    read one at a time and copied straight into one preallocated tensor per output, so peak memory is
    the result plus one expert matrix. A gap raises :class:`CheckpointError` (``missing_label``).
    """
    missing = [f"{prefix}.{e}.{p}_proj.weight" for e in range(n) for p in ("gate", "up", "down")
               if (e, p) not in parts]
    if missing:
        raise CheckpointError(_listing(missing_label, missing))
    out = {}
    for stacked, projs in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
        buf = None
        for e in range(n):
            ts = [read(parts[(e, p)]) for p in projs]
            if buf is None:
                buf = torch.empty((n, sum(t.shape[0] for t in ts), *ts[0].shape[1:]), dtype=dtype or ts[0].dtype,
                                  device=device if device is not None else ts[0].device)
            r = 0
            for t in ts:
                buf[e, r:r + t.shape[0]].copy_(t)
                r += t.shape[0]
        out[f"{prefix}.{stacked}"] = buf
    return out


def _check_names_and_shapes(where: str, want: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                            tolerated: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected (less ``tolerated``) or mis-shaped tensors."""
    missing = set(want) - set(found)
    if missing:
        raise CheckpointError(_listing(f"missing tensors in {where}", missing))
    unexpected = set(found) - set(want) - set(tolerated)
    if unexpected:
        raise CheckpointError(_listing(f"unexpected tensors in {where}", unexpected))
    bad = [f"{n}: expected {list(want[n])}, found {list(found[n])}" for n in sorted(want)
           if tuple(found[n]) != tuple(want[n])]
    if bad:
        raise CheckpointError(_listing(f"tensors with the wrong shape in {where}", bad, limit=6))


def _listing(what: str, names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{what} ({len(names)}): {shown}{more}"


# ---- reading ------------------------------------------------------------------------------------

def weight_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file of a checkpoint directory (from the index, or the single file)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = {name: directory / fname for name, fname in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(_listing(f"shard files named in {index} are missing", absent))
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return {name: single for name in _safetensors_keys(single)}
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}"
                          + (f" (found {', '.join(found)})" if found else ""))


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def load_state_dict(directory: str | Path, config: MoGEConfig | None = None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu",
                    expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """Read a published-layout directory into our (stacked-expert) state dict.

    Tensors are read memory-mapped shard by shard, cast to ``dtype`` (None keeps the stored dtype) and
    placed on ``device``. With ``expected`` (native name -> shape, e.g. from a meta-device model) the
    checkpoint is checked before any data is read: missing, unexpected or mis-shaped tensors raise
    :class:`CheckpointError` naming them, with expected and found shapes.
    """
    from safetensors import safe_open

    directory = Path(directory)
    dtype = resolve_dtype(dtype)
    config = config if config is not None else read_config(directory)
    files = weight_files(directory)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        if not _IGNORED_RE.search(name):
            by_file.setdefault(path, []).append(name)

    # Shapes from the headers only: validate everything before materialising anything.
    shapes: dict[str, tuple[int, ...]] = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                lost = [n for n in names if n not in present]
                if lost:
                    raise CheckpointError(_listing(f"tensors listed in the index are absent from {path}", lost))
                for n in names:
                    shapes[n] = tuple(f.get_slice(n).get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    if expected is not None:
        # a tied head may be stored redundantly
        _check_names_and_shapes(str(directory), _published_names(expected, config.tie_word_embeddings), shapes,
                                tolerated=["lm_head.weight"] if config.tie_word_embeddings else [])

    dev = torch.device(device)
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[tuple[int, str], str]] = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for path in by_file:
            try:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:
                raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None

        def read(name: str) -> Tensor:
            try:
                return handles[files[name]].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {name} from {files[name]}: {e}") from None

        for name in shapes:
            m = _PER_EXPERT_RE.match(name)
            if m is not None:
                experts.setdefault(m.group("prefix"), {})[(int(m.group("e")), m.group("proj"))] = name
            elif not (config.tie_word_embeddings and name == "lm_head.weight"):
                t = read(name)
                out[name] = t.to(device=dev, dtype=dtype or t.dtype)
        for prefix, parts in experts.items():
            out.update(_stack_experts(prefix, parts, config.num_experts, read, dtype, dev,
                                      f"missing tensors in {directory}"))
    return out


def _build_on_meta(config: MoGEConfig):
    from .model import MoGEForCausalLM
    with torch.device("meta"):
        return MoGEForCausalLM(config)


def load_into(module: torch.nn.Module, directory: str | Path, config: MoGEConfig,
              dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a checkpoint into ``module`` (built on the meta device, parameter names as in the checkpoint
    with stacked experts) by assigning the loaded tensors; re-creates the RoPE buffer and re-ties."""
    from .model import RotaryEmbedding

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sd = load_state_dict(directory, config, dtype, device, expected=expected)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    module.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    # Non-persistent buffer: rebuilt from the config on the target device, always float32.
    module.model.rotary = RotaryEmbedding(config.resolved_head_dim, config.rope_theta).to(device)
    return module


def load_pretrained(directory: str | Path, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu"):
    """Load a published-layout checkpoint directory into a :class:`~moge.model.MoGEForCausalLM`.

    The model is built on the meta device and the memory-mapped tensors are assigned to it, cast to
    ``dtype`` (``None``/``"auto"`` keeps the stored dtype) on ``device``; no float32 copy of the whole
    model is made. Missing / unexpected / mis-shaped tensors, unreadable files and a missing
    ``config.json`` raise :class:`CheckpointError` naming them. Returns the model in eval mode.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist" if not directory.exists()
                              else f"{directory} is not a directory")
    config = read_config(directory)
    model = load_into(_build_on_meta(config), directory, config, dtype, device)
    return model.eval()


# ---- writing ------------------------------------------------------------------------------------

def _shard_plan(tensors: Mapping[str, Tensor], max_bytes: int) -> list[list[str]]:
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


def save_state_dict(published: Mapping[str, Tensor], directory: str | Path, max_shard_size: int | str = "2GB",
                    progress: bool = False) -> list[str]:
    """Write published-name tensors as safetensors (one file, or shards plus an index); returns file names.

    Every file is written atomically. Shards are copied to contiguous CPU tensors one shard at a time,
    so peak extra memory is about one shard. Stale shards of an earlier save are removed afterwards.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan = _shard_plan(published, parse_size(max_shard_size))
    names = ([WEIGHTS_NAME] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(t.numel() * t.element_size() for t in published.values()), unit="B",
                   unit_scale=True, desc=f"writing {directory.name}")
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, plan):
        # clone(): per-expert views share storage with the stacked tensor, which safetensors refuses.
        data = {n: published[n].detach().to("cpu").contiguous().clone() for n in shard}
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


def save_pretrained(model: Any, directory: str | Path, max_shard_size: int | str = "2GB",
                    tokenizer_file: str | Path | None = None, progress: bool = False) -> Path:
    """Write ``model`` in the published layout: weights (``model.safetensors`` or shards plus
    ``model.safetensors.index.json``), then ``config.json``, then optionally ``tokenizer.json``.

    Works for :class:`~moge.model.MoGEForCausalLM` and the transformers wrapper, also inside
    ``torch.compile`` / DDP wrappers. Each file is written
    atomically (temporary file, fsync, ``os.replace``); ``config.json`` comes after the weights, so a
    directory with a config always has a complete set of weights. Returns the directory.
    """
    directory = Path(directory)
    model = unwrap_model(model)
    config = model_config(model)
    published = to_published_state_dict(_normalise_names(model.state_dict()), config)
    save_state_dict(published, directory, max_shard_size, progress)
    d = config.to_hf_dict()
    dtypes = {t.dtype for t in published.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        d["dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
    write_json(directory / CONFIG_NAME, d)
    if tokenizer_file is not None:
        src = Path(tokenizer_file)
        if not src.is_file():
            raise CheckpointError(f"tokenizer file {src} does not exist")
        if src.resolve() != (directory / TOKENIZER_NAME).resolve():
            atomic_write(directory / TOKENIZER_NAME, lambda tmp: shutil.copyfile(src, tmp))
    return directory


# ---- CLI ------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint directory, or a state-dict file (.safetensors / .pt) with --config/--preset")
    p.add_argument("dst", help="output directory (published layout)")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
                   help="dtype of the written weights (default: as stored)")
    p.add_argument("--config", help="config.json for a state-dict SRC")
    p.add_argument("--preset", help="preset name for a state-dict SRC (instead of --config)")
    p.add_argument("--tokenizer", help="tokenizer.json to copy into DST (default: SRC's, if any)")


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


def _normalise_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrappers' prefixes (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def convert(src: str | Path, dst: str | Path, max_shard_size: int | str = "2GB", dtype: str | None = None,
            config: MoGEConfig | None = None, tokenizer_file: str | Path | None = None,
            progress: bool = False) -> Path:
    """Convert ``src`` (a checkpoint directory or a state-dict file) into the published layout at ``dst``.

    A directory is loaded with :func:`load_pretrained` and re-written (re-sharded, optionally cast).
    A file is read as a :class:`MoGEForCausalLM` state dict with stacked or per-expert expert names and
    needs ``config`` (or a ``config.json`` next to it). Tensors are checked against the config.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"source {src} does not exist")
    if dst.exists() and dst.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise CheckpointError(f"destination {dst} is the source directory; write to a new directory")
    tdtype = resolve_dtype(dtype)
    if src.is_dir():
        if config is not None:
            raise CheckpointError("--config/--preset are only for a state-dict file; a directory has its config.json")
        model = load_pretrained(src, dtype=tdtype)
        if tokenizer_file is None and (src / TOKENIZER_NAME).is_file():
            tokenizer_file = src / TOKENIZER_NAME
        return save_pretrained(model, dst, max_shard_size, tokenizer_file, progress)
    if config is None:
        if (src.parent / CONFIG_NAME).is_file():
            config = read_config(src.parent)
        else:
            raise CheckpointError(f"{src} is a state-dict file: pass --config CONFIG.json or --preset NAME")
    sd = _normalise_names(_read_state_dict_file(src))
    if any(_PER_EXPERT_RE.match(k) for k in sd):
        sd = from_published_state_dict(sd, config)
    model = _build_on_meta(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
    sd = {k: v for k, v in sd.items() if not _IGNORED_RE.search(k)}
    _check_names_and_shapes(str(src), expected, {k: tuple(v.shape) for k, v in sd.items()})
    if tdtype is not None:
        sd = {k: v.to(tdtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return save_pretrained(model, dst, max_shard_size, tokenizer_file, progress)


def run(args: argparse.Namespace) -> int:
    config = None
    if args.config and args.preset:
        raise CheckpointError("give --config or --preset, not both")
    if args.config:
        config = read_config(args.config)
    elif args.preset:
        from .config import get_config
        config = get_config(args.preset)
    out = convert(args.src, args.dst, args.max_shard_size, None if args.dtype == "auto" else args.dtype, config,
                  args.tokenizer, progress=True)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    size = sum((out / f).stat().st_size for f in files if f.endswith(".safetensors"))
    print(f"wrote {out}: {', '.join(files)} ({size / 1e6:.1f} MB of weights)")
    return 0
