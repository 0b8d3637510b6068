"""The transformers base model is moge's backbone, and the forward runs at fixed shapes where transformers
compiles it: the base model is a PreTrainedModel holding the checkpoint's tensor names, static caches
attend over all their slots (full-graph compile), packed sequences stay apart, and the attention
implementation switches at runtime."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, PreTrainedModel, StaticCache

import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
from helpers import single_thread  # noqa: F401 (fixture)
from hf_helpers import lm, tiny_config  # noqa: F401 (lm: fixture)
from moge.hf import (PanguProMoEForCausalLM, PanguProMoEForQuestionAnswering,
                     PanguProMoEForSequenceClassification, PanguProMoEForTokenClassification, PanguProMoEModel)
from moge.model import Backbone, MoGEForCausalLM
from moge.model.attention import ATTENTION_KERNELS

HEADS = (PanguProMoEForCausalLM, PanguProMoEForSequenceClassification, PanguProMoEForTokenClassification,
         PanguProMoEForQuestionAnswering)
IDS = torch.tensor([[1, 5, 9, 33, 70, 12], [3, 44, 3, 8, 18, 61]])


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_base_model_is_a_pretrained_model_holding_the_checkpoint_names(cls):
    cfg = tiny_config()
    model = cls(cfg)
    assert type(model.base_model) is PanguProMoEModel and model.base_model is model.model
    assert isinstance(model.model, PreTrainedModel) and isinstance(model.model, Backbone)
    native = {k for k in MoGEForCausalLM(cfg.to_moge_config()).state_dict() if k.startswith("model.")}
    assert {k for k in model.state_dict() if k.startswith("model.")} == native  # the released layout's names
    alone = PanguProMoEModel(cfg)
    assert set(alone.state_dict()) == {k[len("model."):] for k in native}  # transformers' base-model names
    # The parallel plans are the base model's, under `model.`, as transformers composes them.
    assert {k: v for k, v in model.tp_plan.items() if k != "lm_head"} == {f"model.{k}": v
                                                                         for k, v in alone.tp_plan.items()}
    assert {k: v for k, v in model.fsdp_plan.items() if k != "lm_head"} == {f"model.{k}": v
                                                                           for k, v in alone.fsdp_plan.items()}


def test_base_model_checkpoint_loads_into_the_causal_lm_and_back(lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm.base_model.save_pretrained("base")  # transformers' test_correct_missing_keys starts here
    with safe_open("base/model.safetensors", "pt") as f:
        assert f.keys() and all(k.startswith("model.") for k in f.keys())  # the released layout
    again, info = AutoModelForCausalLM.from_pretrained("base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"} and not info["unexpected_keys"]
    for k, v in lm.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0)

    lm.save_pretrained("lm")
    base, info = AutoModel.from_pretrained("lm", output_loading_info=True)
    assert isinstance(base, PanguProMoEModel)
    assert info["unexpected_keys"] == {"lm_head.weight"} and not info["missing_keys"]
    with torch.no_grad():
        h = base(input_ids=IDS).last_hidden_state
        torch.testing.assert_close(h, lm(input_ids=IDS, output_hidden_states=True).hidden_states[-1],
                                   rtol=0, atol=0)
        # The engine's entry point and transformers' forward are one backbone.
        torch.testing.assert_close(base.backbone_forward(IDS)[0], h, rtol=0, atol=0)


def _slot_inputs(lm, ids, mask2d, cache):
    b, s = ids.shape
    mask4d = lm.create_masks_for_generate(inputs_embeds=torch.empty(b, s, 0), attention_mask=mask2d, cache=cache)
    positions = (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
    return mask4d, positions


def test_static_cache_forward_compiles_without_graph_breaks_and_matches_the_dynamic_cache(lm):
    """What transformers' full-graph compile of a static-cache decode step needs (``_can_compile_fullgraph``):
    a fixed-shape ``[B,1,S,max_len]`` slot mask and no graph break, with the dynamic cache's logits."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    step_ids = torch.tensor([[7], [11]])
    with torch.no_grad():
        dyn = DynamicCache(config=lm.config)
        want_prefill = lm(IDS, mask, None, dyn).logits
        full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        want_step = lm(step_ids, full, None, dyn).logits

        torch._dynamo.reset()
        compiled = torch.compile(lm, backend="eager", fullgraph=True)
        cache = StaticCache(config=lm.config, max_cache_len=12)
        mask4d, pos = _slot_inputs(lm, IDS, mask, cache)
        assert mask4d.shape == (2, 1, 6, 12) and mask4d.dtype == torch.bool
        got_prefill = compiled(IDS, mask4d, pos, cache).logits
        mask4d, pos = _slot_inputs(lm, step_ids, full, cache)
        assert mask4d.shape == (2, 1, 1, 12)  # the same width at every step: nothing recompiles on the length
        got_step = compiled(step_ids, mask4d, pos, cache).logits
    real = mask.bool()
    torch.testing.assert_close(got_prefill[real], want_prefill[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_step, want_step, rtol=1e-5, atol=1e-5)


def test_static_cache_with_a_2d_mask_forward_matches_the_dynamic_cache(lm):
    """A static cache passed straight to ``forward`` with the 2-D padding mask (no ``generate``)."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        want = lm(IDS, mask, None, DynamicCache(config=lm.config)).logits
        got = lm(IDS, mask, None, StaticCache(config=lm.config, max_cache_len=8)).logits
        with pytest.raises(ValueError, match="static cache holds 4 positions"):
            lm(IDS, mask, None, StaticCache(config=lm.config, max_cache_len=4))
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences_attend_within_their_own_sequence(lm, use_cache):
    """``DataCollatorWithFlattening``'s form (one row, positions restarting, no mask): each sequence's logits
    are those it has alone, as transformers' models give them."""
    a, b = IDS[:1, :4], IDS[1:, :3]
    packed, positions = torch.cat([a, b], 1), torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        alone_a, alone_b = (lm(x, use_cache=False).logits[0] for x in (a, b))
        got = lm(packed, position_ids=positions, use_cache=use_cache).logits[0]
        whole = lm(packed, use_cache=False).logits[0]  # without the positions: one sequence
    torch.testing.assert_close(got[:4], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[4:], alone_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole[4:], alone_b, atol=1e-3)


def test_set_attn_implementation_switches_the_kernels_at_runtime(lm):
    with torch.no_grad():
        sdpa = lm(IDS).logits
        lm.set_attn_implementation("eager")
        assert all(layer.self_attn.attention_kernel is ATTENTION_KERNELS["eager"] for layer in lm.model.layers)
        eager = lm(IDS).logits
        lm.set_attn_implementation("sdpa")
    assert all(layer.self_attn.attention_kernel is ATTENTION_KERNELS["sdpa"] for layer in lm.model.layers)
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
