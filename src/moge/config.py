"""One architecture dataclass for every MoGE / Pangu Pro MoE model size, plus named presets.

The field names follow the published Pangu Pro MoE ``config.json`` so a checkpoint's config maps onto
this class key for key. Fields the published config does not have (``num_groups``, ``router``, ...)
carry defaults that reproduce the published model: in particular a missing group count means one
expert per group, i.e. ``num_groups == num_experts_per_tok`` (docs/design.md section 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MoGEError


ROUTERS = ("moge", "topk", "group_limited")


class ConfigError(MoGEError, ValueError):
    """A model configuration that cannot describe a valid model; the message names the fields."""


@dataclass
class MoGEConfig:
    """Architecture of a decoder-only MoGE language model (Pangu Pro MoE at any size).

    ``num_groups`` is the number M of contiguous expert groups (one per device under expert
    parallelism); ``None`` reads as ``num_experts_per_tok`` as in the published config. ``router``
    picks the routing rule (``moge``, ``topk`` or ``group_limited``) with the same parameters, so a
    top-K baseline differs from its MoGE twin only in that one field.
    """

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_dropout: float = 0.0  # dropout on attention probabilities while training (released: 0.0)
    # MoE
    num_experts: int = 16
    num_experts_per_tok: int = 4
    num_groups: int | None = None
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 256  # 0 disables the shared expert
    router: str = "moge"
    topk_groups: int | None = None  # group_limited only; None -> half the groups (at least 1)
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    mlp_only_layers: list[int] = field(default_factory=list)
    intermediate_size: int | None = None  # dense MLP width for mlp_only_layers; None -> same active FLOPs
    experts_backend: str = "auto"
    # multi-token prediction: predictors stored after the decoder layers (0 = none, as released)
    num_mtp_layers: int = 0
    # init and special tokens
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        if not isinstance(self.mlp_only_layers, (list, tuple)):
            raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}")
        self.mlp_only_layers = list(self.mlp_only_layers)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        """M: the explicit group count, else ``num_experts_per_tok`` (one expert per group)."""
        return self.num_groups if self.num_groups is not None else self.num_experts_per_tok

    @property
    def experts_per_group(self) -> int:
        """G = N / M."""
        return self.num_experts // self.groups

    @property
    def k_per_group(self) -> int:
        """K' = K / M, experts chosen in every group."""
        return self.num_experts_per_tok // self.groups

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_topk_groups(self) -> int:
        return self.topk_groups if self.topk_groups is not None else max(1, self.groups // 2)

    @property
    def dense_intermediate_size(self) -> int:
        """Width of a dense MLP layer: by default the same activated FLOPs as an MoE layer."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return self.moe_intermediate_size * self.num_experts_per_tok + self.shared_expert_intermediate_size

    # ---- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the offending fields if the sizes are inconsistent."""
        self._check_types()
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (SwiGLU experts, as released), got {self.hidden_act!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        m, n, k = self.groups, self.num_experts, self.num_experts_per_tok
        if m < 1:
            raise ConfigError(f"num_groups must be >= 1, got {m}")
        if n % m:
            raise ConfigError(f"num_experts={n} is not divisible by num_groups={m}")
        if k > n:
            raise ConfigError(f"num_experts_per_tok={k} exceeds num_experts={n}")
        if self.router == "moge" and k % m:
            raise ConfigError(f"MoGE needs num_experts_per_tok={k} divisible by num_groups={m} (K' = K/M per group)")
        if self.router == "group_limited":
            tg = self.resolved_topk_groups
            if not 1 <= tg <= m or tg * (n // m) < k:
                raise ConfigError(f"topk_groups={tg} must be in [1, num_groups={m}] and keep at least "
                                  f"num_experts_per_tok={k} experts ({tg} x {n // m} available)")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}; set head_dim explicitly")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} out of range for num_hidden_layers={self.num_hidden_layers}")

    def _check_types(self) -> None:
        """Every field's type and range (a hand-edited config.json may hold anything)."""
        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                what = "a positive integer" if lo == 1 else "an integer" if lo < 0 else f">= {lo}"
                raise ConfigError(f"{name} must be {what}{' or null' if optional else ''}, got {v!r}")

        def number(name: str, lo: float, lo_open: bool) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v > lo if lo_open else v >= lo)
            if not ok:
                raise ConfigError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo}, got {v!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "max_position_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            integer(name, 1)
        integer("shared_expert_intermediate_size", 0)
        integer("num_mtp_layers", 0)
        for name in ("head_dim", "topk_groups", "intermediate_size"):
            integer(name, 1, optional=True)
        integer("num_groups", -(1 << 62), optional=True)  # its range is checked below, with the others
        for name, lo, lo_open in (("rms_norm_eps", 0.0, True), ("rope_theta", 0.0, True),
                                  ("attention_dropout", 0.0, False), ("router_aux_loss_coef", 0.0, False),
                                  ("router_z_loss_coef", 0.0, False), ("initializer_range", 0.0, False)):
            number(name, lo, lo_open)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("router", "hidden_act", "experts_backend"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        # experts_backend names a registered backend: the MoE layer checks it (moge.model.moe) when the
        # model is built, so this foundation module stays below the kernels and free of torch.
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            for i in ids:
                if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size):
                    raise ConfigError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}) or null, "
                                      f"got {v!r}")
        bad = [i for i in self.mlp_only_layers if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise ConfigError(f"mlp_only_layers must hold integer layer indices, got {self.mlp_only_layers!r}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has the MoGE MLP; MTP predictors (index >= L) always do."""
        return layer_idx not in self.mlp_only_layers

    # ---- (de)serialisation ----------------------------------------------------------------------
    def replace(self, **changes: Any) -> "MoGEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoGEConfig":
        """Build from a dict such as a published ``config.json``; keys we do not model are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object / dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("mlp_only_layers") is None:
            kwargs.pop("mlp_only_layers", None)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "MoGEConfig":
        """Build from a ``config.json`` file or a directory holding one (see :func:`read_config_dict`)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        return cls.from_dict(read_config_dict(path))


# The released name first; "PanGuMoE" is a pre-release name (and moge 0.1 wrote it).
MODEL_TYPES = ("PanguProMoE", "PanGuMoE")


def read_config_dict(path: Path) -> dict[str, Any]:
    """The JSON object of a ``config.json``; :class:`ConfigError` if it is not JSON, not an object, or
    names another ``model_type``."""
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    mt = d.get("model_type")
    if mt is not None and mt not in MODEL_TYPES:
        raise ConfigError(f"{path}: model_type {mt!r} is not a Pangu Pro MoE checkpoint (expected one of "
                          f"{', '.join(map(repr, MODEL_TYPES))})")
    return d


PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: unit tests and smoke runs
    "debug": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, num_experts=8,
                  num_experts_per_tok=4, num_groups=4, moe_intermediate_size=32,
                  shared_expert_intermediate_size=64, rope_theta=10000.0),
    # trainable on a 2-core CPU in minutes (the demo)
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, num_experts=16,
                 num_experts_per_tok=4, num_groups=4, moe_intermediate_size=96,
                 shared_expert_intermediate_size=192, rope_theta=10000.0),
    # a GPU-sized model with the 72B's routing shape (64 experts, 8 groups, 1 per group)
    "small": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=4096, num_experts=64,
                  num_experts_per_tok=8, num_groups=8, moe_intermediate_size=256,
                  shared_expert_intermediate_size=1024, rope_theta=1_000_000.0),
    # the published Pangu Pro MoE (docs/design.md section 5)
    "pangu-pro-moe-72b": dict(vocab_size=153376, hidden_size=5120, num_hidden_layers=48,
                              num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=131072, rms_norm_eps=1e-5,
                              rope_theta=16_000_000.0, tie_word_embeddings=False, num_experts=64,
                              num_experts_per_tok=8, num_groups=8, moe_intermediate_size=1344,
                              shared_expert_intermediate_size=5376, router_aux_loss_coef=0.001,
                              initializer_range=0.02),
}


def get_config(name: str, **overrides: Any) -> MoGEConfig:
    """The named preset (see :data:`PRESETS`) with optional field overrides."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MoGEConfig)})
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}; the fields are {[f.name for f in dataclasses.fields(MoGEConfig)]}")
    return MoGEConfig(**{**PRESETS[name], **overrides})


def resolve_config(spec: str) -> MoGEConfig:
    """A config from a preset name or a path to a checkpoint directory / ``config.json``."""
    if spec in PRESETS:
        return get_config(spec)
    if Path(spec).exists():
        return MoGEConfig.from_json(spec)
    raise ConfigError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
                      f"checkpoint directory or config.json")
