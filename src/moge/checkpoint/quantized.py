"""The Ascend W8A8 checkpoint layout (docs/design.md section 7.4), as the public Ascend loaders read it.

A quantized checkpoint is a released-layout directory (``config.json``, safetensors shards, one entry per
routed expert matrix) plus ``quant_model_description.json``, which maps every tensor name to ``"W8A8"``
(static activations), ``"W8A8_DYNAMIC"`` (per-token activations) or ``"FLOAT"``, and holds
``model_quant_type``. Per quantized linear ``p``:

=====================  ===============  ===========================================================
``p.weight``           int8 ``[O, I]``  per-output-channel symmetric weights
``p.weight_scale``     ``[O, 1]``       weight scale per output channel
``p.weight_offset``    ``[O, 1]``       weight zero point (0: symmetric)
``p.input_scale``      ``[1]``          static activation scale (W8A8 only, as the rest of this table)
``p.input_offset``     int8 ``[1]``     static activation zero point
``p.quant_bias``       int32 ``[O]``    bias and zero-point correction in accumulator units
``p.deq_scale``        float32 ``[O]``  ``input_scale * weight_scale`` (int64 float bits also read)
=====================  ===============  ===========================================================

so that ``y = deq_scale * (clamp(round(x / input_scale) + input_offset) @ weight.T + quant_bias)``. A
``W8A8_DYNAMIC`` linear has the first three and its float ``p.bias`` if any. Routed experts are stored per
expert (``...mlp.experts.{e}.{gate,up,down}_proj.*``) and stacked on load; the router, embeddings, norms
and output head are ``FLOAT``. Within one expert gate and up must share their activation quantization
(they are one stacked matmul here). Writing gives every expert of a layer the same activation scale.

Pure functions (:func:`to_ascend_state_dict`, :func:`from_ascend`) between our in-memory state dict (see
:mod:`moge.quant.modules`) and these names, around the confined I/O of :mod:`.io`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import MoGEConfig
from ..quant import QuantError, install_quantized
from .hf_files import write_companions, write_quant_notes
from .io import (CheckpointError, header_shapes, listing, open_shards, read_json, save_shards, to_dtype_device,
                 weight_files, writable_dir, write_json, writing)
from .layout import (QUANT_DESCRIPTION_NAME, check_names_and_shapes, group_expert_names, released_config_dict,
                     stack_experts, to_published_state_dict)
from .reading import assign_loaded, check_tokenizer_file, resolve_device, tensor_reader, verify_against_manifest


ASCEND_TYPES = {"static": "W8A8", "dynamic": "W8A8_DYNAMIC"}
ACT_OF_TYPE = {v: k for k, v in ASCEND_TYPES.items()}
FLOAT = "FLOAT"
# description keys that are not tensor names
_META_KEYS = {"model_quant_type", "kv_quant_type", "fa_quant_type", "reduce_quant_type", "version", "group_size",
              "metadata", "model_type"}
_STATIC_FIELDS = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")
_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.(?P<field>\w+)$")


# ---- our state dict -> Ascend names ----------------------------------------------------------------

def _quant_prefixes(sd: Mapping[str, Tensor]) -> dict[str, str]:
    """Module name -> ``static``/``dynamic`` for every int8 module of our state dict."""
    out = {}
    for k, t in sd.items():
        if k.endswith(".weight") and t.dtype == torch.int8 and f"{k[:-7]}.weight_scale" in sd:
            p = k[:-7]
            out[p] = "static" if f"{p}.input_scale" in sd else "dynamic"
    return out


def _linear_tensors(get: Callable[[str], Tensor | None], act: str, rows: slice | None = None,
                    e: int | None = None) -> dict[str, Tensor]:
    """One Ascend linear from an in-memory :class:`~moge.quant.Int8Linear` state (``get(field)``), optionally
    expert ``e`` and output rows ``rows`` of a stacked one."""
    def pick(t: Tensor, per_row: bool) -> Tensor:
        t = t if e is None else t[e]
        return t[rows] if per_row and rows is not None else t

    w, ws = pick(get("weight"), True), pick(get("weight_scale"), True).float()
    out = {"weight": w, "weight_scale": ws.unsqueeze(-1), "weight_offset": torch.zeros_like(ws).unsqueeze(-1)}
    if act == "static":
        s, off = pick(get("input_scale"), False).float(), pick(get("input_offset"), False)
        out.update(input_scale=s.reshape(1), input_offset=off.reshape(1).round().to(torch.int8),
                   quant_bias=pick(get("quant_bias"), True).to(torch.int32), deq_scale=(s.reshape(1) * ws).float())
    elif get("bias") is not None:
        out["bias"] = pick(get("bias"), True)
    return out


def to_ascend_state_dict(state_dict: Mapping[str, Tensor],
                         config: MoGEConfig | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Our quantized state dict -> ``(tensors under Ascend names, quant description)``.

    A module carrying an ``input_smooth`` divisor (``--smoothing per-expert``) cannot be written: the layout
    has one smoothing per shared input, folded into its norm (the point of eq. 10).
    """
    quant = _quant_prefixes(state_dict)
    smoothed = sorted(p for p in quant if f"{p}.input_smooth" in state_dict)
    if smoothed:
        raise CheckpointError(f"{smoothed[0]} carries its own input smoothing (per-expert smoothing), which the "
                              f"Ascend W8A8 layout cannot hold: experts that share an input share one smoothing "
                              f"folded into its RMSNorm; use --smoothing expert-aware or none to write a checkpoint")
    owned = {f"{p}.{f}" for p in quant for f in ("weight", "weight_scale", "input_scale", "input_offset",
                                                 "quant_bias", "bias", "input_smooth")}
    tensors = to_published_state_dict({k: v for k, v in state_dict.items() if k not in owned}, config)
    desc = {k: FLOAT for k in tensors}
    for p, act in quant.items():
        def get(f: str, p: str = p) -> Tensor | None:
            return state_dict.get(f"{p}.{f}")
        typ = ASCEND_TYPES[act]
        w = get("weight")
        if w.dim() == 2:
            parts = {p: _linear_tensors(get, act)}
        else:  # stacked experts: ...mlp.experts.gate_up_proj / down_proj
            base, _, which = p.rpartition(".")
            parts = {}
            for e in range(w.shape[0]):
                if which == "gate_up_proj":
                    f = w.shape[1] // 2
                    parts[f"{base}.{e}.gate_proj"] = _linear_tensors(get, act, slice(0, f), e)
                    parts[f"{base}.{e}.up_proj"] = _linear_tensors(get, act, slice(f, None), e)
                else:
                    parts[f"{base}.{e}.down_proj"] = _linear_tensors(get, act, None, e)
        for name, fields in parts.items():
            for f, t in fields.items():
                tensors[f"{name}.{f}"] = t
                desc[f"{name}.{f}"] = typ
    types = sorted({ASCEND_TYPES[a] for a in quant.values()})
    desc = {"model_quant_type": types[0] if len(types) == 1 else "W8A8", **desc}
    return tensors, desc


# ---- Ascend names -> our state dict ----------------------------------------------------------------

def read_description(directory: Path) -> dict[str, str]:
    """``quant_model_description.json`` checked: an object of strings (metadata keys may be anything);
    :class:`CheckpointError` for an int8 KV cache or a quantization type moge does not run."""
    path = Path(directory) / QUANT_DESCRIPTION_NAME
    d = read_json(path, "quantization description")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a JSON object mapping tensor names to quantization types")
    for key in ("kv_quant_type", "fa_quant_type"):
        if d.get(key) not in (None, "", FLOAT):
            raise CheckpointError(f"{path}: {key} {d[key]!r} (a quantized KV cache / attention) is not supported")
    mqt = d.get("model_quant_type")
    if mqt is not None and mqt not in (*ACT_OF_TYPE, FLOAT):
        raise CheckpointError(f"{path}: model_quant_type {mqt!r} is not supported (moge runs "
                              f"{', '.join(ACT_OF_TYPE)})")
    bad = [f"{k}: {v!r}" for k, v in d.items() if k not in _META_KEYS and v not in (*ACT_OF_TYPE, FLOAT)]
    if bad:
        raise CheckpointError(listing(f"{path}: unsupported quantization types (moge runs "
                                      f"{', '.join(ACT_OF_TYPE)} and FLOAT)", bad, limit=6))
    return {k: v for k, v in d.items() if k not in _META_KEYS}


def quant_plan(description: Mapping[str, str], names: list[str]) -> dict[str, str]:
    """Module name (experts stacked: ``...mlp.experts``) -> ``static``/``dynamic`` from a description.

    Every expert matrix of a layer must have the same type (they are stacked); :class:`CheckpointError` names
    the first that differs or is missing.
    """
    plan: dict[str, str] = {}
    experts: dict[str, dict[tuple[int, str], str]] = {}
    for n in names:
        if not n.endswith(".weight"):
            continue
        typ = description.get(n, FLOAT)
        m = _EXPERT_RE.match(n)
        if m is not None:
            experts.setdefault(m.group("prefix"), {})[(int(m.group("e")), m.group("proj"))] = typ
        elif typ != FLOAT:
            plan[n[:-7]] = ACT_OF_TYPE[typ]
    for prefix, types in experts.items():
        kinds = set(types.values())
        if len(kinds) > 1:
            raise CheckpointError(f"the experts of {prefix} mix quantization types {sorted(kinds)}; moge stacks a "
                                  f"layer's experts, so they must all be one type")
        kind = kinds.pop()
        if kind != FLOAT:
            plan[prefix] = ACT_OF_TYPE[kind]
    return plan


def _float32(t: Tensor, what: str) -> Tensor:
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{what} has non-finite values")
    return t


def _deq_float(t: Tensor, what: str) -> Tensor:
    """``deq_scale`` as float32: stored as floats, or (fp16 deployments) as the float32 bits in an int64."""
    if t.dtype in (torch.int64, torch.int32):
        t = t.to(torch.int32).view(torch.float32)
    return _float32(t, what)


def _read_linear(read: Callable[[str], Tensor], p: str, act: str) -> dict[str, Tensor]:
    """One Ascend linear ``p`` -> our :class:`~moge.quant.Int8Linear` fields, checked."""
    w = read(f"{p}.weight")
    if w.dtype != torch.int8:
        raise CheckpointError(f"{p}.weight is {w.dtype}, expected int8 for a {ASCEND_TYPES[act]} linear")
    ws = _float32(read(f"{p}.weight_scale"), f"{p}.weight_scale").reshape(-1)
    if bool((read(f"{p}.weight_offset").float() != 0).any()):
        raise CheckpointError(f"{p}.weight_offset is not zero: asymmetric int8 weights are not supported")
    out = {"weight": w, "weight_scale": ws}
    if act == "dynamic":
        return out
    s = _float32(read(f"{p}.input_scale"), f"{p}.input_scale").reshape(1)
    if not bool(s[0] > 0):
        raise CheckpointError(f"{p}.input_scale must be positive, got {float(s[0])}")
    off = read(f"{p}.input_offset").double().reshape(1)
    if not bool((off == off.round()).all() and (off >= -128).all() and (off <= 127).all()):
        raise CheckpointError(f"{p}.input_offset must be an int8 zero point, got {off.tolist()}")
    qb = read(f"{p}.quant_bias")
    if qb.is_floating_point() or qb.dtype == torch.int8 or (qb.abs() > 2**31 - 1).any():
        raise CheckpointError(f"{p}.quant_bias must be int32, got {qb.dtype}")
    deq = _deq_float(read(f"{p}.deq_scale"), f"{p}.deq_scale").reshape(-1)
    # deq_scale is what the Ascend kernel multiplies by; weight_scale may be stored in a lower precision
    derived = deq / s
    if not torch.allclose(derived, ws, rtol=1e-2, atol=0.0):
        raise CheckpointError(f"{p}.deq_scale is not input_scale * weight_scale (first of {ws.numel()}: "
                              f"{float(deq[0])} vs {float(s[0] * ws[0])})")
    if not torch.allclose(derived, ws, rtol=1e-6, atol=0.0):  # a lower-precision weight_scale: deq_scale wins
        ws = derived
    out.update(weight_scale=ws, input_scale=s, input_offset=off.float(), quant_bias=qb.to(torch.int32))
    return out


def _read_experts(read: Callable[[str], Tensor], prefix: str, n: int, act: str) -> dict[str, Tensor]:
    """A layer's per-expert Ascend linears -> stacked ``gate_up_proj.*`` / ``down_proj.*`` fields."""
    out: dict[str, Tensor] = {}
    for stacked, projs in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
        per_e = []
        for e in range(n):
            parts = [_read_linear(read, f"{prefix}.{e}.{p}_proj", act) for p in projs]
            for f in ("input_scale", "input_offset"):
                if f in parts[0] and len(parts) == 2 and not torch.equal(parts[0][f], parts[1][f]):
                    raise CheckpointError(f"{prefix}.{e}: gate_proj and up_proj have different {f} "
                                          f"({parts[0][f].tolist()} vs {parts[1][f].tolist()}); moge runs them as one "
                                          f"matmul, so they must share their activation quantization")
            per_e.append({f: (torch.cat([q[f] for q in parts]) if f not in ("input_scale", "input_offset")
                              else parts[0][f]) for f in parts[0]})
        for f in per_e[0]:
            out[f"{prefix}.{stacked}.{f}"] = torch.stack([q[f] for q in per_e])
    return out


def from_ascend(read: Callable[[str], Tensor], names: list[str], plan: Mapping[str, str], config: MoGEConfig,
                dtype: torch.dtype | None, device: torch.device) -> dict[str, Tensor]:
    """Ascend tensors (through ``read(name)``) -> our state dict for the modules of ``plan``; float tensors
    are cast to ``dtype``, quantization scales stay float32."""
    out: dict[str, Tensor] = {}
    owned: set[str] = set()
    for p, act in plan.items():
        if p.endswith(".mlp.experts"):
            fields = _read_experts(read, p, config.num_experts, act)
            owned |= {n for n in names if n.startswith(p + ".")}
        else:
            fields = {f"{p}.{f}": t for f, t in _read_linear(read, p, act).items()}
            owned |= {f"{p}.{f}" for f in (*_STATIC_FIELDS, "bias")}
            if act == "dynamic" and f"{p}.bias" in names:
                fields[f"{p}.bias"] = _float32(read(f"{p}.bias"), f"{p}.bias")
        out.update({k: v.to(device) for k, v in fields.items()})
    rest = [n for n in names if n not in owned]
    plain, experts = group_expert_names(rest)
    for n in plain:
        if not (config.tie_word_embeddings and n == "lm_head.weight"):
            out[n] = to_dtype_device(read(n), dtype, device)
    for prefix, parts in experts.items():
        out.update(stack_experts(prefix, parts, config.num_experts, read, dtype, device, "missing expert tensors"))
    return out


# ---- directories -----------------------------------------------------------------------------------

def load_quantized_into(module: torch.nn.Module, directory: str | Path, config: MoGEConfig,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        verify: bool = True) -> torch.nn.Module:
    """Load an Ascend W8A8 directory into ``module`` (a float model built on the meta device): the int8
    modules its description names are installed first, every tensor name, shape and dtype is checked
    before data is read, then the tensors are assigned. ``verify`` as for float checkpoints: a training
    manifest, if any, is checked, and float tensors holding NaN/inf are refused by name."""

    directory = Path(directory)
    dev = resolve_device(device)
    description = read_description(directory)
    files = weight_files(directory)
    if verify:
        verify_against_manifest(directory, set(files.values()))
    names = sorted(files)
    plan = quant_plan(description, names)
    try:
        install_quantized(module, plan)
    except QuantError as e:
        raise CheckpointError(f"{directory / QUANT_DESCRIPTION_NAME}: {e}") from None
    expected_pub, _ = to_ascend_state_dict(module.state_dict(), config)
    with open_shards(sorted(set(files.values()))) as handles:
        shapes = header_shapes(files, handles)
        # a float bias next to quant_bias is redundant (the Ascend kernel ignores it): tolerated
        extra_bias = [f"{p}.bias" for p, a in plan.items() if a == "static" and f"{p}.bias" in shapes]
        tolerated = extra_bias + (["lm_head.weight"] if config.tie_word_embeddings else [])
        check_names_and_shapes(str(directory), {k: tuple(v.shape) for k, v in expected_pub.items()}, shapes,
                               tolerated=tolerated)
        int8 = [n for n in names if handles[files[n]].get_slice(n).get_dtype() in ("I8", "U8")
                and expected_pub.get(n) is not None and expected_pub[n].dtype != torch.int8
                and not n.endswith(".input_offset")]
        if int8:
            raise CheckpointError(listing(f"{directory}: integer tensors described as FLOAT (not in "
                                          f"{QUANT_DESCRIPTION_NAME} as W8A8)", int8))

        sd = from_ascend(tensor_reader(handles, files, verify), [n for n in names if n not in extra_bias], plan, config, dtype, dev)
    return assign_loaded(module, sd, config, device)


def save_quantized(directory: str | Path, config: MoGEConfig, state_dict: Mapping[str, Tensor],
                   max_shard_size: int | str = "2GB", tokenizer_file: str | Path | None = None, progress: bool = False,
                   config_overrides: Mapping[str, Any] | None = None,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a quantized state dict in the Ascend W8A8 layout: shards, then the description (and moge's
    calibration notes in ``moge_quantization.json`` when given), then ``config.json``; each file atomic."""

    directory = Path(directory)
    tensors, desc = to_ascend_state_dict(state_dict, config)  # refuses what the layout cannot hold, first
    if tokenizer_file is not None:
        check_tokenizer_file(tokenizer_file)
    writable_dir(directory, "checkpoint directory")
    with writing("checkpoint", directory):
        save_shards(tensors, directory, max_shard_size, progress)
        write_json(directory / QUANT_DESCRIPTION_NAME, desc)
        write_quant_notes(directory, metadata)
        dtypes = {t.dtype for k, t in tensors.items() if t.is_floating_point() and desc.get(k) == FLOAT}
        write_json(directory / "config.json",
                   released_config_dict(config, next(iter(dtypes)) if len(dtypes) == 1 else None, config_overrides))
        write_companions(directory, config, tokenizer_file)
    return directory
