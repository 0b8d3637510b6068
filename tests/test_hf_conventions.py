"""The transformers wrapper follows transformers' model conventions (one test per convention): what
transformers' own test suite checks of every in-tree model, asserted here with our own checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
from helpers import single_thread  # noqa: F401 (fixture)
from hf_helpers import lm, tiny_config  # noqa: F401 (lm: fixture)
from moge.model import Backbone
from moge.model.attention import ATTENTION_KERNELS, RotaryEmbedding
from moge.hf import (PanguProMoEForCausalLM, PanguProMoEForQuestionAnswering,
                     PanguProMoEForSequenceClassification, PanguProMoEForTokenClassification, PanguProMoEModel)
from moge.hf.loading import MetaDeviceContextError, ShapeMismatchError

CLASSES = (PanguProMoEModel, PanguProMoEForCausalLM, PanguProMoEForSequenceClassification,
           PanguProMoEForTokenClassification, PanguProMoEForQuestionAnswering)
IDS = torch.tensor([[1, 5, 9, 33, 70, 12, 4, 60], [1, 44, 3, 3, 18, 61, 90, 7]])


def load_report() -> CaptureLogger:
    """Captures transformers' load report (logged by ``transformers.modeling_utils``, as its loader does)."""
    return CaptureLogger(hf_logging.get_logger("transformers.modeling_utils"))


pytestmark = pytest.mark.usefixtures("single_thread")


def test_generate_returns_tensors_autograd_can_train_on(lm):
    out = lm.generate(IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                      output_scores=True)
    assert not out.sequences.is_inference() and not any(s.is_inference() for s in out.scores)
    layer0 = out.past_key_values.layers[0]
    assert not layer0.keys.is_inference() and not layer0.values.is_inference()
    lm.train()
    loss = lm(input_ids=out.sequences, labels=out.sequences).loss  # an RL-style loop trains on its samples
    loss.backward()
    assert lm.lm_head.weight.grad is not None
    # and the returned cache continues a forward with gradients (what continuing from a prompt does)
    step = lm(input_ids=out.sequences[:, -1:], cache=out.past_key_values, use_cache=True).logits
    step.sum().backward()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_set_input_embeddings_replaces_the_embedding_the_forward_uses(cls):
    torch.manual_seed(0)
    model = cls(tiny_config()).eval()
    new = nn.Embedding(97, 32)
    with torch.no_grad():
        new.weight.zero_()
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new
    backbone = next(m for m in model.modules() if isinstance(m, Backbone))
    assert backbone.embed_tokens is new
    with torch.no_grad():  # all-zero embeddings: every position attends to equal values -> equal rows
        h = backbone.backbone_forward(IDS[:1])[0]
    torch.testing.assert_close(h[0], h[0, :1].expand_as(h[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_init_weights_after_to_empty_rebuilds_the_rope_table(cls):
    with torch.device("meta"):
        model = cls(tiny_config(rope_theta=5000.0))
    model.to_empty(device="cpu")
    rotary = next(m for m in model.modules() if isinstance(m, RotaryEmbedding))
    rotary.inv_freq.fill_(float("nan"))  # what to_empty leaves may be anything
    model.init_weights()
    torch.testing.assert_close(rotary.inv_freq, RotaryEmbedding(8, 5000.0).inv_freq, rtol=0, atol=0)


def test_attn_implementation_eager_is_honoured_and_agrees_with_sdpa(lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm.save_pretrained("ckpt")
    eager = AutoModelForCausalLM.from_pretrained("ckpt", attn_implementation="eager")
    sdpa = AutoModelForCausalLM.from_pretrained("ckpt", attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.attention_kernel is ATTENTION_KERNELS["eager"] for layer in eager.model.layers)
    assert all(layer.self_attn.attention_kernel is ATTENTION_KERNELS["sdpa"] for layer in sdpa.model.layers)
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with torch.no_grad():
        a = eager(input_ids=IDS, attention_mask=mask).logits
        b = sdpa(input_ids=IDS, attention_mask=mask).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_output_attentions_are_the_probabilities_the_output_is_computed_from(lm):
    out = lm(input_ids=IDS, output_attentions=True)
    probs = out.attentions[0]
    assert probs.shape == (2, 4, 8, 8) and probs.requires_grad
    probs.retain_grad()
    out.logits[:, -1].sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 8))
    assert (probs.detach().triu(1) == 0).all()  # causal
    # the kernel swap lasts one call: the model is back on SDPA
    assert all(layer.self_attn.attention_kernel is ATTENTION_KERNELS["sdpa"] for layer in lm.model.layers)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_only_generative_classes_write_a_generation_config(cls, tmp_path):
    torch.manual_seed(0)
    cls(tiny_config()).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "generation_config.json").is_file() == cls.can_generate()


def test_from_pretrained_none_with_config_and_state_dict(lm):
    again = PanguProMoEForCausalLM.from_pretrained(None, config=lm.config, state_dict=lm.state_dict())
    assert again.state_dict().keys() == lm.state_dict().keys()
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(TypeError, match="config= and state_dict="):
        PanguProMoEForCausalLM.from_pretrained(None, config=lm.config)


def test_missing_tensors_are_initialised_and_reported_integrity_stays_strict(lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm.save_pretrained("ckpt")
    from safetensors.torch import load_file, save_file
    tensors = load_file("ckpt/model.safetensors")
    q_weight = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.norm.weight"]
    save_file(tensors, "ckpt/model.safetensors", metadata={"format": "pt"})
    with load_report() as report:
        model, info = AutoModelForCausalLM.from_pretrained("ckpt", output_loading_info=True)
    assert "MISSING" in report.out and "model.norm.weight" in report.out  # transformers' own load report
    assert info["missing_keys"] == {"model.layers.0.self_attn.q_proj.bias", "model.norm.weight"}
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.bias, torch.zeros(32))  # the model's own rule: zero biases, unit norms
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    assert torch.equal(attn.q_proj.weight, q_weight)  # the module's other tensor is the checkpoint's
    tensors["model.norm.weight"] = torch.full((32,), float("nan"))
    save_file(tensors, "ckpt/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="(?i)nan"):  # integrity is not loosened with the keys
        AutoModelForCausalLM.from_pretrained("ckpt")


def test_mismatched_sizes_refused_unless_asked_to_reinitialise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    head = PanguProMoEForSequenceClassification(tiny_config(num_labels=3))
    head.save_pretrained("cls")
    with pytest.raises(ShapeMismatchError, match="ignore_mismatched_sizes") as e:
        AutoModelForSequenceClassification.from_pretrained("cls", num_labels=5)
    assert isinstance(e.value, RuntimeError) and "score.weight" in str(e.value)
    with load_report() as report:
        new, info = AutoModelForSequenceClassification.from_pretrained("cls", num_labels=5, output_loading_info=True,
                                                                       ignore_mismatched_sizes=True)
    assert "Reinit due to size mismatch" in report.out and "score.weight" in report.out
    assert info["mismatched_keys"] == {("score.weight", (3, 32), (5, 32))}
    assert new.score.weight.shape == (5, 32)
    torch.testing.assert_close(new.model.embed_tokens.weight, head.model.embed_tokens.weight)
    with torch.no_grad():
        assert new(input_ids=IDS).logits.shape == (2, 5)


def test_from_pretrained_inside_a_meta_device_context_is_a_named_error(lm, tmp_path):
    lm.save_pretrained(tmp_path / "ckpt")
    with torch.device("meta"), pytest.raises(MetaDeviceContextError, match="meta device context"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert issubclass(MetaDeviceContextError, RuntimeError)


def test_shift_labels_are_the_targets_and_labels_are_then_unused(lm):
    labels = IDS.clone()
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    with torch.no_grad():
        by_labels = lm(input_ids=IDS, labels=labels).loss
        by_shift = lm(input_ids=IDS, shift_labels=shifted).loss
        other_labels = lm(input_ids=IDS, labels=torch.zeros_like(labels), shift_labels=shifted).loss
        other_shift = lm(input_ids=IDS, labels=labels, shift_labels=torch.zeros_like(shifted)).loss
    torch.testing.assert_close(by_shift, by_labels)
    torch.testing.assert_close(other_labels, by_shift)
    assert not torch.allclose(other_shift, by_shift)
    with pytest.raises(ValueError, match="shift_labels must be"):
        lm(input_ids=IDS, shift_labels=shifted[:, 1:])


@pytest.mark.parametrize("cls", (PanguProMoEModel, PanguProMoEForCausalLM), ids=lambda c: c.__name__)
def test_parallel_plans_name_modules_that_exist(cls):
    import re

    model = cls(tiny_config(mlp_only_layers=[1], intermediate_size=40))
    names = {re.sub(r"\.\d+(\.|$)", r".*\1", n) for n, _ in model.named_modules()}
    assert model._tp_plan and model._fsdp_plan
    for plan in (model._tp_plan, model._fsdp_plan):
        assert set(plan) <= names, set(plan) - names


def test_balance_loss_counts_real_tokens_only():
    """A left-padded row's aux loss equals the same row's without the padding (its real tokens route the
    same: padding is masked and positions start at the first real token); z-loss included."""
    torch.manual_seed(0)
    lm = PanguProMoEForCausalLM(tiny_config(router_z_loss_coef=0.01)).eval()
    row = IDS[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], 1)
    with torch.no_grad():
        alone = lm(input_ids=row, output_router_logits=True).aux_loss
        with_pad = lm(input_ids=padded, attention_mask=mask, output_router_logits=True).aux_loss
        counted = lm(input_ids=padded, output_router_logits=True).aux_loss  # no mask: pads are tokens
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(counted, alone)


def test_decoder_layers_are_transformers_checkpointing_layers_and_recompute(lm):
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in lm.model.layers)
    lm.train()
    reference = lm(input_ids=IDS, labels=IDS, output_router_logits=True)
    reference.loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    calls = []
    hook = lm.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    lm.gradient_checkpointing_enable()
    assert lm.is_activation_checkpointing
    assert all(m.gradient_checkpointing for m in lm.modules() if hasattr(m, "gradient_checkpointing"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_cache switched off while checkpointing
        out = lm(input_ids=IDS, labels=IDS, output_router_logits=True)
    calls.clear()
    out.loss.backward()
    hook.remove()
    assert calls, "the layer was not recomputed in the backward"
    torch.testing.assert_close(out.loss, reference.loss)
    for n, p in lm.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)
    lm.gradient_checkpointing_disable()
    assert not any(m.gradient_checkpointing for m in lm.modules() if hasattr(m, "gradient_checkpointing"))


def test_tensor_parallel_keywords(lm, tmp_path, monkeypatch):
    from torch.distributed.tensor import DTensor
    from transformers import DistributedConfig

    monkeypatch.chdir(tmp_path)
    lm.save_pretrained("ckpt")
    with pytest.raises(TypeError, match="once"):
        AutoModelForCausalLM.from_pretrained("ckpt", tp_plan="auto", distributed_config=DistributedConfig(tp_plan="auto"))
    with pytest.raises(TypeError, match="device_mesh"):
        AutoModelForCausalLM.from_pretrained("ckpt", device_mesh=object())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = AutoModelForCausalLM.from_pretrained("ckpt", tp_plan="auto")  # one process: nothing to shard
    assert not any(isinstance(p, DTensor) for p in one.parameters())
    with torch.no_grad():
        torch.testing.assert_close(one(input_ids=IDS).logits, lm(input_ids=IDS).logits, rtol=0, atol=0)


def test_unused_stored_tensors_are_skipped_not_judged(lm, tmp_path, monkeypatch):
    """A tensor the class does not use is reported, not read: even one moge would refuse to load (an
    integer tensor); with nothing usable stored, every tensor is initialised and reported."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    lm.save_pretrained("ckpt")
    save_file({"extra.counter": torch.tensor([1, 2])}, "ckpt/model.safetensors", metadata={"format": "pt"})
    with load_report() as report:
        model, info = AutoModelForCausalLM.from_pretrained("ckpt", output_loading_info=True)
    assert "UNEXPECTED" in report.out and "extra.counter" in report.out
    assert info["unexpected_keys"] == {"extra.counter"}
    assert info["missing_keys"] == set(lm.state_dict())
    assert model.lm_head.weight.dtype == torch.float32 and torch.isfinite(model.lm_head.weight).all()


def test_tp_plan_has_dense_rules_only_with_dense_layers():
    moe_only = PanguProMoEForCausalLM(tiny_config())
    with_dense = PanguProMoEForCausalLM(tiny_config(mlp_only_layers=[1], intermediate_size=40))
    assert "model.layers.*.mlp.down_proj" not in moe_only.tp_plan
    assert moe_only.tp_plan["model.layers.*.mlp.shared_expert.down_proj"] == "rowwise"
    assert with_dense.tp_plan["model.layers.*.mlp.down_proj"] == "rowwise"
    heads = PanguProMoEForSequenceClassification(tiny_config())
    # The heads hold the same base model at the same place: its plan, under `model.`, embedding included.
    assert heads.tp_plan == {k: v for k, v in moe_only.tp_plan.items() if k != "lm_head"}
    assert moe_only.tp_plan["model.embed_tokens"] == "embedding_rowwise"
