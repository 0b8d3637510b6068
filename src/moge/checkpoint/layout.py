"""The released Pangu Pro MoE checkpoint layout: tensor names and ``config.json`` keys (docs/design.md section 5).

Pure functions between our in-memory form and the released one, no file I/O beyond reading small
metadata files:

* Tensors. The released layout stores every routed expert as its own three matrices
  (``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``); the model keeps them stacked
  (``experts.gate_up_proj [N,2F,H]``, rows ``:F`` the gate and ``F:`` the up projection;
  ``experts.down_proj [N,H,F]``). :func:`to_published_state_dict` / :func:`stack_experts` go
  between the two.
* MTP predictors (``mtp.{k}.*`` in the model) are stored as the decoder layers after the last one,
  ``model.layers.{L+k}.*``, each with a ``shared_head.head.weight`` copy of the output head (the
  public layout, docs/design.md section 7.5); :func:`mtp_native_name` and :func:`to_published_state_dict` map
  between the two, and the copy is checked against the head on load (the model shares one head).
* Config. :func:`released_config_dict` writes what the released loaders read (``model_type:
  "PanguProMoE"``, ``architectures: ["PanguProMoEForCausalLM"]``, every released key, ``torch_dtype``)
  and our own keys only where they differ from what the released model implies.
  :func:`config_from_dict` reads a released (or pre-release ``PanGuMoE``, or older moge) config, filling
  pad/bos/eos from the directory's tokenizer when the config lacks them.

Shape legend
    N  routed experts   F  expert intermediate size   H  hidden size
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import MoGEConfig
from .io import CheckpointError, confined, listing, read_json


RELEASED_MODEL_TYPE = "PanguProMoE"
RELEASED_ARCHITECTURE = "PanguProMoEForCausalLM"
QUANT_DESCRIPTION_NAME = "quant_model_description.json"

# model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
PER_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
STACKED_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up|down)_proj$")
# Buffers some exporters write that carry no learned state (docs/design.md section 5: ignored on load).
IGNORED_RE = re.compile(r"(^|\.)(rotary_emb|rotary)\.inv_freq$|(^|\.)inv_freq$")

SPECIAL_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")
# When neither config.json nor a tokenizer names the special tokens: the public configs of the
# 153,376-token Pangu tokenizer family (docs/design.md section 5, not verified for this model), else moge's own.
_PANGU_VOCAB, _PANGU_SPECIALS = 153376, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 45892}
_MOGE_SPECIALS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


MTP_NATIVE_RE = re.compile(r"^mtp\.(?P<k>\d+)\.(?P<rest>.+)$")
LAYER_RE = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
SHARED_HEAD = "shared_head.head.weight"


# ---- tensors ---------------------------------------------------------------------------------------

def mtp_native_name(name: str, num_hidden_layers: int) -> str:
    """A published name -> ours: ``model.layers.{L+k}.X`` -> ``mtp.{k}.X`` (an MTP predictor), others unchanged."""
    m = LAYER_RE.match(name)
    if m is None or int(m.group("i")) < num_hidden_layers:
        return name
    return f"mtp.{int(m.group('i')) - num_hidden_layers}.{m.group('rest')}"


def shared_head_names(config: MoGEConfig) -> list[str]:
    """The published names of the predictors' head copies (``model.layers.{L+k}.shared_head.head.weight``)."""
    L = config.num_hidden_layers
    return [f"model.layers.{L + k}.{SHARED_HEAD}" for k in range(config.num_mtp_layers)]


def _mtp_published(state_dict: Mapping[str, Tensor], config: MoGEConfig | None) -> dict[str, Tensor]:
    """``mtp.{k}.X`` -> ``model.layers.{L+k}.X``, plus each predictor's copy of the output head."""
    if not any(MTP_NATIVE_RE.match(n) for n in state_dict):
        return dict(state_dict)
    if config is None:
        raise CheckpointError("a state dict with MTP predictors (mtp.*) needs its config to be written in the "
                              "released layout (the predictors are stored after the num_hidden_layers layers)")
    L, out = config.num_hidden_layers, {}
    for name, t in state_dict.items():
        m = MTP_NATIVE_RE.match(name)
        out[f"model.layers.{L + int(m.group('k'))}.{m.group('rest')}" if m else name] = t
    head = state_dict.get("lm_head.weight", state_dict.get("model.embed_tokens.weight"))
    if head is not None:
        for name in shared_head_names(config):
            out[name] = head
    return out


def to_published_state_dict(state_dict: Mapping[str, Tensor], config: MoGEConfig | None = None) -> dict[str, Tensor]:
    """Our state dict (stacked experts) -> the published tensor names (one entry per expert matrix).

    Entries are views (no copy); RoPE buffers are dropped, and with ``config.tie_word_embeddings`` so
    is ``lm_head.weight`` (it is the embedding). MTP predictors become the layers after the last
    decoder layer, each with a ``shared_head.head.weight`` (the output head, shared in memory).
    """
    out: dict[str, Tensor] = {}
    for name, t in _mtp_published(state_dict, config).items():
        if IGNORED_RE.search(name):
            continue
        if config is not None and config.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = STACKED_RE.match(name)
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


def published_shapes(native_shapes: Mapping[str, tuple[int, ...]], config: MoGEConfig) -> dict[str, tuple[int, ...]]:
    """Expected published names and shapes from the native parameter shapes (the predictors' head
    copies left out: optional on disk, see :func:`check_shared_heads`)."""
    fake = {k: torch.empty(s, device="meta") for k, s in native_shapes.items()}
    pub = to_published_state_dict(fake, config)
    if config.tie_word_embeddings:
        pub.pop("lm_head.weight", None)
    for name in shared_head_names(config):
        pub.pop(name, None)
    return {k: tuple(v.shape) for k, v in pub.items()}


def check_shared_heads(copies: Mapping[str, Tensor], head_VH: Tensor, where: str) -> None:
    """Warn when a stored predictor head copy differs from the output head: the model has one head,
    shared by the main model and every predictor (docs/design.md section 7.5), and uses the main one."""
    differ = [n for n, t in copies.items()
              if tuple(t.shape) != tuple(head_VH.shape) or not torch.equal(t.to(head_VH.device, head_VH.dtype), head_VH)]
    if differ:
        warnings.warn(f"{where}: {', '.join(sorted(differ))} differ from the output head; the MTP predictors share "
                      f"the main model's head (lm_head), which is used", stacklevel=3)


def group_expert_names(names: Iterable[str]) -> tuple[list[str], dict[str, dict[tuple[int, str], str]]]:
    """Split names into plain ones and per-expert ones grouped by layer prefix:
    ``(plain, {prefix: {(expert, "gate"|"up"|"down"): name}})``; RoPE buffers are dropped."""
    plain, experts = [], {}
    for name in names:
        if IGNORED_RE.search(name):
            continue
        m = PER_EXPERT_RE.match(name)
        if m is None:
            plain.append(name)
        else:
            experts.setdefault(m.group("prefix"), {})[(int(m.group("e")), m.group("proj"))] = name
    return plain, experts


def stack_experts(prefix: str, parts: Mapping[tuple[int, str], Any], n: int, read: Callable[[Any], Tensor],
                  dtype: torch.dtype | None, device: torch.device | None, missing_label: str) -> dict[str, Tensor]:
    """Stack one layer's per-expert matrices into ``{prefix}.gate_up_proj [N,2F,H]`` / ``down_proj [N,H,F]``.

    ``parts`` maps ``(expert, "gate"|"up"|"down")`` to whatever ``read`` turns into a tensor; tensors are
    read one at a time and copied straight into one preallocated tensor per output, so peak memory is
    the result plus one expert matrix. A gap or an expert id >= ``n`` raises :class:`CheckpointError`.
    """
    extra = [f"{prefix}.{e}.{p}_proj.weight" for e, p in parts if e >= n]
    if extra:
        raise CheckpointError(listing(f"unexpected expert tensors (num_experts={n})", extra))
    missing = [f"{prefix}.{e}.{p}_proj.weight" for e in range(n) for p in ("gate", "up", "down")
               if (e, p) not in parts]
    if missing:
        raise CheckpointError(listing(missing_label, missing))
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


def from_published_state_dict(state_dict: Mapping[str, Tensor], config: MoGEConfig | None = None,
                              dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Published tensor names -> our state dict (experts stacked into ``gate_up_proj`` / ``down_proj``).

    Every layer's experts must be complete (``0..N-1``, with gate, up and down each); a gap raises
    :class:`CheckpointError` naming the missing tensor. ``dtype`` converts while stacking. With
    ``config``, the layers after the last decoder layer become MTP predictors (``mtp.{k}.*``) and their
    head copies are dropped (checked against the head).
    """
    copies = {n: state_dict[n] for n in (shared_head_names(config) if config is not None else []) if n in state_dict}
    plain, experts = group_expert_names(n for n in state_dict if n not in copies)
    out = {name: state_dict[name] if dtype is None else state_dict[name].to(dtype) for name in plain}
    for prefix, parts in experts.items():
        n = config.num_experts if config is not None else 1 + max(e for e, _ in parts)
        out.update(stack_experts(prefix, parts, n, state_dict.__getitem__, dtype, None, "missing expert tensors"))
    if config is None:
        return out
    head = out.get("lm_head.weight", out.get("model.embed_tokens.weight"))
    if copies and head is not None and head.device.type != "meta":
        check_shared_heads(copies, head, "state dict")
    return {mtp_native_name(k, config.num_hidden_layers): v for k, v in out.items()}


def check_names_and_shapes(where: str, want: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                           tolerated: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected (less ``tolerated``) or mis-shaped tensors."""
    missing = set(want) - set(found)
    if missing:
        raise CheckpointError(listing(f"missing tensors in {where}", missing))
    unexpected = set(found) - set(want) - set(tolerated)
    if unexpected:
        raise CheckpointError(listing(f"unexpected tensors in {where}", unexpected))
    bad = [f"{n}: expected {list(want[n])}, found {list(found[n])}" for n in sorted(want)
           if tuple(found[n]) != tuple(want[n])]
    if bad:
        raise CheckpointError(listing(f"tensors with the wrong shape in {where}", bad, limit=6))


# ---- config.json -----------------------------------------------------------------------------------

def released_config_dict(config: MoGEConfig, dtype: torch.dtype | None = None,
                         overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``config`` as the released loaders read it (docs/design.md section 5).

    Every key of the released ``PanguProMoEConfig`` in its order, then pad/bos/eos where set, then our
    own keys only where the value differs from what the released model implies (a group count other
    than ``num_experts_per_tok``, a non-MoGE router, a chosen experts backend, ...). ``overrides``
    sets transformers-level keys such as ``use_cache`` / ``output_router_logits``.
    """
    c = config
    d: dict[str, Any] = {
        "architectures": [RELEASED_ARCHITECTURE], "model_type": RELEASED_MODEL_TYPE,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "hidden_act": c.hidden_act, "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range, "rms_norm_eps": c.rms_norm_eps, "use_cache": True,
        "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta,
        "attention_dropout": c.attention_dropout, "moe_intermediate_size": c.moe_intermediate_size,
        "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
        "num_experts_per_tok": c.num_experts_per_tok, "num_experts": c.num_experts,
        "output_router_logits": False, "router_aux_loss_coef": c.router_aux_loss_coef,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
    }
    d.update({k: v for k, v in (overrides or {}).items() if k in d})
    for key in SPECIAL_TOKEN_KEYS:
        if getattr(c, key) is not None:
            d[key] = getattr(c, key)
    ours = {
        "head_dim": (c.head_dim, c.head_dim is not None and c.head_dim != c.hidden_size // c.num_attention_heads),
        "num_groups": (c.groups, c.groups != c.num_experts_per_tok),
        "router": (c.router, c.router != "moge"),
        "topk_groups": (c.topk_groups, c.topk_groups is not None),
        "router_z_loss_coef": (c.router_z_loss_coef, c.router_z_loss_coef != 0),
        "mlp_only_layers": (list(c.mlp_only_layers), bool(c.mlp_only_layers)),
        "intermediate_size": (c.intermediate_size, c.intermediate_size is not None),
        "experts_backend": (c.experts_backend, c.experts_backend != "auto"),
        "num_mtp_layers": (c.num_mtp_layers, c.num_mtp_layers > 0),  # the public MTP configs' key
    }
    d.update({k: v for k, (v, differs) in ours.items() if differs})
    return d


def special_token_ids(directory: str | Path) -> dict[str, int]:
    """pad/bos/eos ids named by a checkpoint's tokenizer files, for the keys it can tell.

    Reads ``tokenizer_config.json`` / ``special_tokens_map.json`` for the token strings and
    ``tokenizer.json``'s added tokens (or ``tokenizer_config.json``'s ``added_tokens_decoder``) for
    their ids; a role no file names falls back to moge's tokens (``<pad>``, ``<bos>``, ``<eos>``).
    Unreadable or oddly shaped files contribute nothing (they are not needed to load weights).
    """
    directory = Path(directory)

    def load(name: str) -> dict:
        try:
            p = confined(directory, name)
            if not p.is_file():
                return {}
            d = read_json(p)
        except CheckpointError:
            return {}
        return d if isinstance(d, dict) else {}

    vocab: dict[str, int] = {}
    for tok in load("tokenizer.json").get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and isinstance(tok.get("id"), int):
            vocab[tok["content"]] = tok["id"]
    tcfg = load("tokenizer_config.json")
    for i, tok in (tcfg.get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and str(i).isdigit():
            vocab.setdefault(tok["content"], int(i))
    names: dict[str, str] = {}
    for source in (load("special_tokens_map.json"), tcfg):
        for role in ("pad", "bos", "eos"):
            v = source.get(f"{role}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                names.setdefault(role, v)
    for role in ("pad", "bos", "eos"):
        names.setdefault(role, f"<{role}>")  # moge's tokenizer convention for roles no file names
    return {f"{role}_token_id": vocab[s] for role, s in names.items() if s in vocab}


def config_from_dict(d: Mapping[str, Any], directory: str | Path | None = None) -> MoGEConfig:
    """A :class:`MoGEConfig` from a ``config.json`` object (released, pre-release or moge-written).

    A config without a group count reads groups = ``num_experts_per_tok``. Missing pad/bos/eos are
    taken from ``directory``'s tokenizer files when they name them; otherwise assumed, with a warning
    that says which values were assumed.
    """
    d = dict(d)
    missing = [k for k in SPECIAL_TOKEN_KEYS if k not in d]
    if missing:
        found = special_token_ids(directory) if directory is not None else {}
        for k in missing:
            if k in found:
                d[k] = found[k]
        still = [k for k in missing if k not in d]
        if still:
            defaults = _PANGU_SPECIALS if d.get("vocab_size") == _PANGU_VOCAB else _MOGE_SPECIALS
            source = ("the Pangu tokenizer family's public ids" if defaults is _PANGU_SPECIALS
                      else "moge's tokenizer ids")
            for k in still:
                d[k] = defaults[k]
            where = f" in {directory}" if directory is not None else ""
            warnings.warn(f"config.json{where} has no {', '.join(still)} and no tokenizer file names them; "
                          f"assuming {', '.join(f'{k}={d[k]}' for k in still)} ({source})", stacklevel=3)
    return MoGEConfig.from_dict(d)


def config_quantization(directory: str | Path) -> Any:
    """The ``quantization_config`` entry of the directory's ``config.json`` (weight-only checkpoints), or None
    when there is none or no readable config (reading the config proper reports that)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        d = read_json(path, "config")
    except CheckpointError:
        return None
    return d.get("quantization_config") if isinstance(d, dict) else None


def quantization_format(directory: str | Path) -> str | None:
    """The name of the quantized format a checkpoint directory is stored in, or None for float weights."""
    if (Path(directory) / QUANT_DESCRIPTION_NAME).is_file():
        return f"Ascend W8A8 ({QUANT_DESCRIPTION_NAME})"
    qc = config_quantization(directory)
    if qc is not None:
        if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
            return f"compressed-tensors {qc.get('format')!s} (quantization_config in config.json)"
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        return f"{method or 'unknown'} (quantization_config in config.json)"
    return None
