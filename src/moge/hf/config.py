"""The transformers configuration classes of Pangu Pro MoE checkpoints.

``PanguProMoEConfig`` is ``model_type: "PanguProMoE"``, the released name (docs/design.md section 5);
``PanGuMoEConfig`` reads a pre-release draft's (and moge 0.1's) ``"PanGuMoE"`` configs and writes the
released name back.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers.configuration_utils import PreTrainedConfig

from ..config import MoGEConfig


def backbone_tp_plan(prefix: str) -> dict[str, str]:
    """Tensor-parallel plan of the backbone's modules under ``prefix``: attention heads and the shared (or
    dense) MLP split Megatron-style, column then row; the router and the routed experts stay replicated
    (each rank computes every expert it routes to; expert parallelism is :mod:`moge.parallel`'s job)."""
    plan = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
            "self_attn.o_proj": "rowwise"}
    for mlp in ("mlp.shared_expert", "mlp"):
        plan |= {f"{mlp}.gate_proj": "colwise", f"{mlp}.up_proj": "colwise", f"{mlp}.down_proj": "rowwise"}
    return {f"{prefix}layers.*.{k}": v for k, v in plan.items()}


class PanguProMoEConfig(PreTrainedConfig):
    """transformers view of :class:`moge.config.MoGEConfig`: the same fields, defaults and JSON keys,
    plus the released transformers-level keys ``use_cache`` and ``output_router_logits``.

    A config without ``num_groups`` reads groups = ``num_experts_per_tok`` (the released config has no
    group count). :meth:`to_moge_config` validates and returns the native config the model is built from.
    """

    model_type = "PanguProMoE"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Relative to the backbone (transformers' convention); the model classes carry it under their prefix.
    base_model_tp_plan: ClassVar[dict[str, str]] = backbone_tp_plan("")

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
    attention_dropout: float = 0.0
    num_experts: int = 16
    num_experts_per_tok: int = 4
    num_groups: int | None = None
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 256
    router: str = "moge"
    topk_groups: int | None = None
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    mlp_only_layers: list[int] | None = None
    intermediate_size: int | None = None
    experts_backend: str = "auto"
    num_mtp_layers: int = 0
    initializer_range: float = 0.02
    use_cache: bool = True
    output_router_logits: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs: Any) -> None:
        self.mlp_only_layers = [] if self.mlp_only_layers is None else list(self.mlp_only_layers)
        super().__post_init__(**kwargs)
        self.to_moge_config()  # fail at load time, naming the field, rather than deep in the model

    def to_moge_config(self) -> MoGEConfig:
        """The native :class:`MoGEConfig` with these field values (raises ``ConfigError`` if inconsistent)."""
        return MoGEConfig.from_dict({k: getattr(self, k) for k in MoGEConfig.__dataclass_fields__})

    @classmethod
    def from_moge_config(cls, config: MoGEConfig, **kwargs: Any) -> "PanguProMoEConfig":
        """The transformers config of a native :class:`MoGEConfig`."""
        return cls(**config.to_dict(), **kwargs)


class PanGuMoEConfig(PanguProMoEConfig):
    """``model_type: "PanGuMoE"`` (a pre-release draft's name, also written by moge 0.1): read as the
    released config, and serialised under the released name."""

    model_type = "PanGuMoE"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["model_type"] = PanguProMoEConfig.model_type
        return d
