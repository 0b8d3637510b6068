"""What the transformers-wrapper tests share: a tiny PanguProMoE config and a causal LM built from it."""

from __future__ import annotations

import pytest
import torch

from moge.hf import PanguProMoEConfig, PanguProMoEForCausalLM


def tiny_config(**kw) -> PanguProMoEConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                initializer_range=0.2, num_labels=3)
    return PanguProMoEConfig(**(base | kw))


@pytest.fixture
def lm() -> PanguProMoEForCausalLM:
    torch.manual_seed(0)
    return PanguProMoEForCausalLM(tiny_config()).eval()
