"""Weight-only int8 / int4 checkpoints in compressed-tensors' ``pack-quantized`` layout (what llm-compressor
writes for W8A16 / W4A16 and vLLM and transformers' compressed-tensors integration read).

A released-layout directory (routed experts one entry per expert) whose ``config.json`` carries::

    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "quantization_status": "compressed",
      "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
          "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                      "group_size": 128, "dynamic": false}}},
      "ignore": ["re:.*mlp\\.gate$", "lm_head"], ...}

(int8: ``num_bits`` 8, ``strategy`` ``channel``, ``group_size`` null). Per quantized linear ``p``:

=====================  ========================  ==========================================================
``p.weight_packed``    int32 ``[O, I * bits/32]``  value ``i`` of a row at bits ``[bits*(i % k), ...)`` of word
                                                   ``i // k`` (``k = 32 / bits``), stored as ``q + 2**(bits-1)``
``p.weight_scale``     float32 ``[O, I / G]``      ``w[o, i] = q[o, i] * weight_scale[o, i // G]``
``p.weight_shape``     int64 ``[2]``               ``[O, I]``
=====================  ========================  ==========================================================

The int4 words' little-endian bytes are exactly moge's in-memory ``qweight`` (:mod:`moge.quant.weight_only`),
so reading is a ``view``; int8 bytes are ``q + 128``. Symmetric only (no ``weight_zero_point``), no
activation quantization, one config group. Pure functions (:func:`to_packed_state_dict`, the readers)
around the confined I/O of :mod:`.io`; every name, shape and dtype is checked before data is read.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import MoGEConfig
from ..quant import QuantError, install_weight_only
from .hf_files import write_companions, write_quant_notes
from .io import (CheckpointError, header_shapes, listing, open_shards, save_shards, to_dtype_device, weight_files,
                 writable_dir, write_json, writing)
from .layout import (QUANT_DESCRIPTION_NAME, check_names_and_shapes, group_expert_names, released_config_dict,
                     stack_experts, to_published_state_dict)
from .reading import (CONFIG_NAME, assign_loaded, check_tokenizer_file, resolve_device, tensor_reader,
                      verify_against_manifest)


FORMAT = "pack-quantized"
METHOD = "compressed-tensors"
_FIELDS = ("weight_packed", "weight_scale", "weight_shape")
_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj$")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def quantization_config(bits: int, group_size: int | None, head_quantized: bool) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` for int8 (per channel) or int4 (groups of ``group_size``)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel" if bits == 8 else "group",
               "group_size": None if bits == 8 else group_size, "dynamic": False, "actorder": None,
               "observer": "minmax"}
    return {"quant_method": METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["re:.*mlp\\.gate$"] + ([] if head_quantized else ["lm_head"]), "kv_cache_scheme": None}


def parse_quantization_config(qc: Any, where: str) -> tuple[int, int | None]:
    """``(bits, group_size)`` of a ``quantization_config``; :class:`CheckpointError` naming what moge does
    not run (another method or format, asymmetric or dynamic weights, quantized activations, ...)."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object")
    method, fmt = qc.get("quant_method"), qc.get("format")
    if method != METHOD or fmt != FORMAT:
        raise CheckpointError(f"{where}: quantization_config quant_method {method!r} / format {fmt!r} is not "
                              f"supported; moge reads {METHOD} {FORMAT!r} (int8 / int4 weight-only) and the "
                              f"Ascend W8A8 layout")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(f"{where}: quantization_config needs exactly one config group, got "
                              f"{len(groups) if isinstance(groups, dict) else groups!r}")
    group = next(iter(groups.values()))
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        raise CheckpointError(f"{where}: the config group has no 'weights' object")
    if group.get("input_activations") or group.get("output_activations"):
        raise CheckpointError(f"{where}: quantized activations are not supported in {FORMAT} (weight-only only)")
    bits, strategy, gs = w.get("num_bits"), w.get("strategy"), w.get("group_size")
    wanted = {8: "channel", 4: "group"}
    if w.get("type", "int") != "int" or not isinstance(bits, int) or bits not in wanted or strategy != wanted[bits]:
        raise CheckpointError(f"{where}: weights {w.get('type')!r} {bits}-bit with strategy {strategy!r} are not "
                              f"supported; moge runs int 8-bit 'channel' and int 4-bit 'group'")
    if w.get("symmetric") is not True or w.get("dynamic", False) or w.get("actorder"):
        raise CheckpointError(f"{where}: only symmetric, static weights without activation ordering are supported "
                              f"(symmetric={w.get('symmetric')!r}, dynamic={w.get('dynamic')!r}, "
                              f"actorder={w.get('actorder')!r})")
    if bits == 4 and (not isinstance(gs, int) or isinstance(gs, bool)):
        raise CheckpointError(f"{where}: int4 weights need an integer group_size, got {gs!r}")
    return bits, (gs if bits == 4 else None)


# ---- our state dict -> packed names ----------------------------------------------------------------

def _pack(q: Tensor) -> Tensor:
    """moge's ``qweight`` ``[O, cols]`` -> ``weight_packed`` int32 (the same bytes, see the module docstring)."""
    u = q if q.dtype == torch.uint8 else (q.to(torch.int16) + 128).to(torch.uint8)
    return u.contiguous().view(torch.int32)


def _unpack(packed: Tensor, bits: int) -> Tensor:
    """``weight_packed`` int32 -> moge's ``qweight``: uint8 nibbles (int4) or int8 (int8)."""
    u = packed.contiguous().view(torch.uint8)
    return u if bits == 4 else (u.to(torch.int16) - 128).to(torch.int8)


def _linear_tensors(q: Tensor, s: Tensor, in_features: int, bias: Tensor | None) -> dict[str, Tensor]:
    out = {"weight_packed": _pack(q), "weight_scale": s, "weight_shape": torch.tensor([q.shape[0], in_features])}
    if bias is not None:
        out["bias"] = bias
    return out


def to_packed_state_dict(state_dict: Mapping[str, Tensor], config: MoGEConfig | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our weight-only state dict -> ``(tensors under released / pack-quantized names, quantization_config)``.
    Works on meta tensors too (for the expected shapes when loading)."""
    prefixes = sorted(k[: -len(".qweight")] for k in state_dict if k.endswith(".qweight"))
    if not prefixes:
        raise CheckpointError("the state dict holds no weight-only (qweight) modules")
    bits_of = {p: 8 if state_dict[f"{p}.qweight"].dtype == torch.int8 else 4 for p in prefixes}
    groups = {}
    for p in prefixes:
        q, s = state_dict[f"{p}.qweight"], state_dict[f"{p}.weight_scale"]
        in_f = q.shape[-1] * (1 if bits_of[p] == 8 else 2)
        groups[p] = in_f // s.shape[-1]
    kinds = {(bits_of[p], groups[p] if bits_of[p] == 4 else None) for p in prefixes}
    if len(kinds) != 1:
        raise CheckpointError(f"a {FORMAT} checkpoint has one config group: every weight-only module must share bits "
                              f"and group size, got {sorted(kinds, key=str)}")
    bits, group_size = kinds.pop()
    owned = {f"{p}.{f}" for p in prefixes for f in ("qweight", "weight_scale", "bias")}
    tensors = to_published_state_dict({k: v for k, v in state_dict.items() if k not in owned}, config)
    for p in prefixes:
        q, s, b = state_dict[f"{p}.qweight"], state_dict[f"{p}.weight_scale"], state_dict.get(f"{p}.bias")
        in_f = q.shape[-1] * (1 if bits == 8 else 2)
        if q.dim() == 2:
            parts = {p: _linear_tensors(q, s, in_f, b)}
        else:  # stacked experts: ...mlp.experts.gate_up_proj / down_proj, stored per expert
            base, _, which = p.rpartition(".")
            parts = {}
            for e in range(q.shape[0]):
                if which == "gate_up_proj":
                    f = q.shape[1] // 2
                    parts[f"{base}.{e}.gate_proj"] = _linear_tensors(q[e, :f], s[e, :f], in_f, None)
                    parts[f"{base}.{e}.up_proj"] = _linear_tensors(q[e, f:], s[e, f:], in_f, None)
                else:
                    parts[f"{base}.{e}.down_proj"] = _linear_tensors(q[e], s[e], in_f, None)
        tensors.update({f"{name}.{f}": t for name, fields in parts.items() for f, t in fields.items()})
    return tensors, quantization_config(bits, group_size, "lm_head" in prefixes)


# ---- packed names -> our state dict ----------------------------------------------------------------

def quantized_modules(names: list[str]) -> set[str]:
    """Our module names (experts stacked: ``...mlp.experts``) that a checkpoint stores weight-only: every
    prefix with any of ``weight_packed`` / ``weight_scale`` / ``weight_shape``."""
    out = set()
    for n in names:
        p, _, field = n.rpartition(".")
        if field in _FIELDS:
            m = _EXPERT_RE.match(p)
            out.add(m.group("prefix") if m else p)
    return out


def _check_dtypes(names: list[str], dtype_of: Callable[[str], str], where: str) -> None:
    """Header dtypes, before any data is read: int32 packed weights, integer shapes, float everything else."""
    bad = []
    for n in names:
        dt, field = dtype_of(n), n.rpartition(".")[2]
        want = ("I32",) if field == "weight_packed" else ("I64", "I32") if field == "weight_shape" else _FLOAT_DTYPES
        if dt not in want:
            bad.append(f"{n}: {dt} (expected {' or '.join(want)})")
    if bad:
        raise CheckpointError(listing(f"tensors with the wrong dtype in {where}", bad, limit=6))


def _read_part(read: Callable[[str], Tensor], p: str, bits: int, rows: int, in_f: int) -> tuple[Tensor, Tensor]:
    """One stored linear ``p`` -> ``(qweight, weight_scale float32)``, its ``weight_shape`` checked."""
    shape = read(f"{p}.weight_shape").tolist()
    if shape != [rows, in_f]:
        raise CheckpointError(f"{p}.weight_shape is {shape}, expected [{rows}, {in_f}]")
    return _unpack(read(f"{p}.weight_packed"), bits), read(f"{p}.weight_scale").float()


def _read_quantized(read: Callable[[str], Tensor], p: str, bits: int, want: Mapping[str, Tensor],
                    device: torch.device) -> dict[str, Tensor]:
    """Our ``p.qweight`` / ``p.weight_scale`` (and bias) from the stored linears; expert stacks are filled
    one expert at a time into buffers of the shapes in ``want`` (the meta model's state dict)."""
    q_w, s_w = want[f"{p}.qweight"], want[f"{p}.weight_scale"]
    in_f = q_w.shape[-1] * (1 if bits == 8 else 2)
    if q_w.dim() == 2:
        q, s = _read_part(read, p, bits, q_w.shape[0], in_f)
        out = {f"{p}.qweight": q.to(device), f"{p}.weight_scale": s.to(device)}
        if f"{p}.bias" in want:
            out[f"{p}.bias"] = read(f"{p}.bias").to(device)
        return out
    q = torch.empty(q_w.shape, dtype=q_w.dtype, device=device)
    s = torch.empty(s_w.shape, dtype=torch.float32, device=device)
    base, _, which = p.rpartition(".")
    projs = ("gate", "up") if which == "gate_up_proj" else ("down",)
    rows = q_w.shape[1] // len(projs)
    for e in range(q_w.shape[0]):
        for i, proj in enumerate(projs):
            qe, se = _read_part(read, f"{base}.{e}.{proj}_proj", bits, rows, in_f)
            q[e, i * rows:(i + 1) * rows].copy_(qe)
            s[e, i * rows:(i + 1) * rows].copy_(se)
    return {f"{p}.qweight": q, f"{p}.weight_scale": s}


def load_weight_only_into(module: torch.nn.Module, directory: str | Path, config: MoGEConfig, qc: Any,
                          dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                          verify: bool = True) -> torch.nn.Module:
    """Load a pack-quantized directory (``qc``: its ``quantization_config``) into ``module`` (a float model
    on the meta device): the weight-only modules its tensors name are installed, every name, shape and
    dtype is checked against them before data is read, then the tensors are assigned. ``verify`` as for
    float checkpoints (manifest hashes, NaN/inf refused by name). Float tensors are cast to ``dtype``."""
    directory = Path(directory)
    dev = resolve_device(device)
    bits, group_size = parse_quantization_config(qc, str(directory / CONFIG_NAME))
    if sys.byteorder != "little":  # the packed words are read by reinterpreting their bytes
        raise CheckpointError(f"reading {FORMAT} weights needs a little-endian machine")
    files = weight_files(directory)
    if verify:
        verify_against_manifest(directory, set(files.values()))
    names = sorted(files)
    plan = quantized_modules(names)
    try:
        install_weight_only(module, plan, bits, group_size)
    except QuantError as e:
        raise CheckpointError(f"{directory} (quantization_config: int{bits}"
                              f"{f', group size {group_size}' if bits == 4 else ''}): {e}") from None
    want = module.state_dict()
    expected, _ = to_packed_state_dict(want, config) if plan else (to_published_state_dict(want, config), None)
    where = f"{directory} (quantization_config: int{bits}{f', group size {group_size}' if bits == 4 else ''})"
    with open_shards(sorted(set(files.values()))) as handles:
        shapes = header_shapes(files, handles)
        check_names_and_shapes(where, {k: tuple(v.shape) for k, v in expected.items()}, shapes,
                               tolerated=["lm_head.weight"] if config.tie_word_embeddings else [])
        _check_dtypes(names, lambda n: handles[files[n]].get_slice(n).get_dtype(), where)
        read = tensor_reader(handles, files, verify)
        sd: dict[str, Tensor] = {}
        for p in (k[: -len(".qweight")] for k in want if k.endswith(".qweight")):
            sd.update(_read_quantized(read, p, bits, want, dev))
        owned = {n for n in names if n.rpartition(".")[2] in _FIELDS or n[: -len(".bias")] in plan}
        plain, experts = group_expert_names(n for n in names if n not in owned)
        for n in plain:
            if not (config.tie_word_embeddings and n == "lm_head.weight"):
                sd[n] = to_dtype_device(read(n), dtype, dev)
        for prefix, parts in experts.items():
            sd.update(stack_experts(prefix, parts, config.num_experts, read, dtype, dev, "missing expert tensors"))
    return assign_loaded(module, sd, config, device)


def save_weight_only(directory: str | Path, config: MoGEConfig, state_dict: Mapping[str, Tensor],
                     max_shard_size: int | str = "2GB", tokenizer_file: str | Path | None = None,
                     progress: bool = False, config_overrides: Mapping[str, Any] | None = None,
                     metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a weight-only state dict in the pack-quantized layout: shards, then moge's notes
    (``moge_quantization.json`` when given), then ``config.json`` with its ``quantization_config``; each file
    atomic. A W8A8 description left in the directory by an earlier save is removed."""
    directory = Path(directory)
    tensors, qc = to_packed_state_dict(state_dict, config)
    if tokenizer_file is not None:
        check_tokenizer_file(tokenizer_file)
    writable_dir(directory, "checkpoint directory")
    with writing("checkpoint", directory):
        save_shards(tensors, directory, max_shard_size, progress)
        if (directory / QUANT_DESCRIPTION_NAME).exists():
            (directory / QUANT_DESCRIPTION_NAME).unlink()
        write_quant_notes(directory, metadata)
        dtypes = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(".weight_scale")}
        cfg = released_config_dict(config, next(iter(dtypes)) if len(dtypes) == 1 else None, config_overrides)
        write_json(directory / CONFIG_NAME, {**cfg, "quantization_config": qc})
        write_companions(directory, config, tokenizer_file)
    return directory
