"""MoGEConfig: the published-config reading of the group count, presets, and validation messages."""

from __future__ import annotations

import json

import pytest

from moge.checkpoint import released_config_dict
from moge.config import PRESETS, ConfigError, MoGEConfig, get_config
from moge.errors import MoGEError


def test_missing_group_count_means_one_expert_per_group():
    cfg = MoGEConfig(num_experts=64, num_experts_per_tok=8)
    assert (cfg.groups, cfg.experts_per_group, cfg.k_per_group) == (8, 8, 1)
    cfg = MoGEConfig.from_dict({"num_experts": 64, "num_experts_per_tok": 8, "model_type": "PanGuMoE",
                                "unknown_key": 1})
    assert cfg.groups == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name, tmp_path):
    cfg = get_config(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(released_config_dict(cfg)))
    again = MoGEConfig.from_json(tmp_path)
    assert released_config_dict(again) == released_config_dict(cfg)
    assert (again.groups, again.resolved_head_dim) == (cfg.groups, cfg.resolved_head_dim)


def test_pangu_preset_matches_spec_table():
    cfg = get_config("pangu-pro-moe-72b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.groups, cfg.k_per_group) == (5120, 48, 64, 8, 1)
    assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.vocab_size) == (1344, 5376, 153376)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=10, num_groups=4), r"num_experts=10 is not divisible by num_groups=4"),
    (dict(num_experts=16, num_experts_per_tok=6, num_groups=4),
     r"MoGE needs num_experts_per_tok=6 divisible by num_groups=4"),
    (dict(num_experts=4, num_experts_per_tok=8, num_groups=1), r"num_experts_per_tok=8 exceeds num_experts=4"),
    (dict(num_groups=0), r"num_groups must be >= 1, got 0"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    (dict(shared_expert_intermediate_size=-1), r"shared_expert_intermediate_size must be >= 0, got -1"),
    (dict(router="hash"), r"router must be one of .*got 'hash'"),
    (dict(router="group_limited", num_experts=16, num_experts_per_tok=8, num_groups=4, topk_groups=1),
     r"topk_groups=1 must be in \[1, num_groups=4\] and keep at least num_experts_per_tok=8 experts \(1 x 4"),
    (dict(hidden_size=100, num_attention_heads=3, num_key_value_heads=1),
     r"hidden_size=100 is not divisible by num_attention_heads=3"),
    (dict(num_attention_heads=4, num_key_value_heads=3), r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    (dict(mlp_only_layers=[0, 7], num_hidden_layers=4), r"mlp_only_layers \[7\] out of range for num_hidden_layers=4"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        MoGEConfig(**kwargs)
    assert isinstance(info.value, MoGEError) and isinstance(info.value, ValueError)


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'"):
        get_config("huge")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        MoGEConfig.from_json(bad)


def test_resolve_config_preset_directory_and_bad_name(tmp_path):
    import json

    from moge.config import ConfigError, get_config, resolve_config

    assert resolve_config("debug") == get_config("debug")
    (tmp_path / "config.json").write_text(json.dumps({**released_config_dict(get_config("tiny")), "num_groups": None}))
    cfg = resolve_config(str(tmp_path))
    assert cfg.groups == cfg.num_experts_per_tok  # a published config without a group count
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_config("no-such-model")
