"""Bad arguments to the public library entry points fail with a named MoGEError (a ValueError or
TypeError too) before any work: regressions for the failures of issue 14, and a hypothesis fuzz over
configs, layer and routing arguments whose only accepted outcomes are success or a MoGEError."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moge import MoGEConfig, MoGEError, MoGELayer, aux_loss, imbalance_score, moge_route, topk_route, z_loss
from moge.errors import ArgumentTypeError, InvalidArgumentError
from moge.generate import GenerationError, generate
from moge.model import MoGEForCausalLM

CFG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
           num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
           shared_expert_intermediate_size=16, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoGEForCausalLM(MoGEConfig(**CFG))


def layer(**kw):
    return MoGELayer(**{**dict(hidden_size=16, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=8,
                               shared_expert_intermediate_size=8, num_groups=4, aux_loss_coef=0.01), **kw})


@pytest.mark.parametrize("call, match", [
    (lambda: moge_route(torch.randn(6, 8), 2.0, 1), "num_groups must be an integer"),
    (lambda: moge_route(torch.randn(6, 8).to(torch.complex64), 4, 1), "real floating-point"),
    (lambda: moge_route(torch.ones(6, 8, dtype=torch.long), 4, 1), "real floating-point"),
    (lambda: moge_route(torch.randn(6, 8), 4, 1, torch.full((1, 8), float("nan"))), "router_scale holds 8 non-finite"),
    (lambda: moge_route([[0.0] * 8], 4, 1), "must be a floating-point torch.Tensor, got list"),
    (lambda: topk_route(torch.randn(6, 8), "2"), "k must be an integer"),
    (lambda: aux_loss(torch.zeros(0, 8), torch.zeros(0, 4, dtype=torch.long)), "empty batch"),
    (lambda: aux_loss(torch.rand(6, 8), torch.full((6, 4), 9)), r"outside \[0, 8\)"),
    (lambda: z_loss(torch.randn(8)), "2-D"),
    (lambda: imbalance_score(torch.full((6, 4), 8), 8, 4), r"expert_ids holds 24 value\(s\) outside \[0, 8\)"),
    (lambda: imbalance_score(torch.zeros(6, 4), 8, 4), "integer tensor"),
    (lambda: layer()(torch.randn(0, 16)), "no tokens"),
    (lambda: layer()(torch.ones(3, 16, dtype=torch.long)), "real floating-point"),
    (lambda: layer()(torch.randn(3, 16, dtype=torch.float64)), "dtype torch.float64 but the layer's weights"),
    (lambda: layer()(torch.randn(3, 15)), "last dimension 16"),
    (lambda: layer(hidden_size=16.0), "hidden_size must be an integer"),
    (lambda: layer(experts_backend="nope"), "experts_backend must be one of"),
    (lambda: MoGEConfig(**{**CFG, "rms_norm_eps": float("nan")}), "rms_norm_eps must be a finite number"),
    (lambda: MoGEConfig(**{**CFG, "pad_token_id": 64}), r"pad_token_id must be a token id in \[0, vocab_size=64\)"),
    (lambda: MoGEConfig(**{**CFG, "hidden_size": True}), "hidden_size must be a positive integer"),
])
def test_library_calls_fail_with_named_errors(call, match):
    with pytest.raises(MoGEError, match=match) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError))


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.full((2, 3), 64)), r"input_ids holds 6 value\(s\) outside \[0, 64\)"),
    (dict(input_ids=torch.full((2, 3), -1)), r"outside \[0, 64\)"),
    (dict(input_ids=torch.zeros(5, dtype=torch.long)), "input_ids must be 2-D"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids is empty"),
    (dict(input_ids=torch.zeros(2, 3)), "integer tensor"),
    (dict(inputs_embeds=torch.randn(2, 3, 31)), "last dimension 32"),
    (dict(), "exactly one of input_ids"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long)), "labels must be"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 2)), "attention_mask must be"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), logits_to_keep=-1), "logits_to_keep"),
])
def test_model_forward_refuses_bad_inputs(model, kwargs, match):
    with pytest.raises(MoGEError, match=match):
        model(**kwargs)


def test_token_id_check_is_on_cpu_by_default_and_can_be_turned_off(model):
    ids = torch.full((1, 2), 64)
    with pytest.raises(InvalidArgumentError):
        model(ids)
    with pytest.raises(InvalidArgumentError):
        model(ids, check_ids=True)
    with pytest.raises(IndexError):  # check_ids=False: the embedding's own error, as documented
        model(ids, check_ids=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_k=2.5), "top_k must be an integer"),
    (dict(max_new_tokens=10 ** 6), "max_position_embeddings=64"),
    (dict(input_ids=torch.full((1, 3), 99)), r"input_ids holds 3 value\(s\) outside \[0, 64\)"),
    (dict(eos_token_id=10 ** 9), "eos_token_id must be an integer in"),
    (dict(generator="seed"), "generator must be a torch.Generator"),
])
def test_generate_refuses_bad_arguments_before_decoding(model, kwargs, match):
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(MoGEError, match=match):
        generate(model, **args)


# ---- fuzz ----------------------------------------------------------------------------------------

EDGE_INTS = st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16, 2 ** 40])
ODD = st.sampled_from([None, True, 2.5, float("nan"), float("inf"), "8", [4]])
VALUE = st.one_of(EDGE_INTS, ODD)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(sorted(CFG) + ["num_groups", "head_dim", "rms_norm_eps", "rope_theta",
                                                             "router", "topk_groups", "intermediate_size",
                                                             "mlp_only_layers", "pad_token_id", "eos_token_id",
                                                             "router_aux_loss_coef", "initializer_range"]),
                               st.one_of(VALUE, st.sampled_from(["moge", "topk", "group_limited", [0], [-1]])),
                               max_size=4),
       batch=st.sampled_from([1, 2]), seq=st.sampled_from([1, 3]), id_shift=st.sampled_from([0, 0, 64, -70]))
def test_fuzz_configs_and_forward(changes, batch, seq, id_shift):
    """Random edits of a small config: either a named error, or a model whose forward runs (tiny
    sizes only) on ids that may be out of range (then a named error)."""
    try:
        cfg = MoGEConfig(**{**CFG, **changes})
    except MoGEError:
        return
    if cfg.hidden_size * cfg.vocab_size > 2 ** 16 or cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size > 2 ** 16 \
            or cfg.num_hidden_layers > 4 or cfg.resolved_head_dim > 64 or (cfg.intermediate_size or 0) > 64 \
            or cfg.shared_expert_intermediate_size > 256:
        return  # valid but too big to build in a unit test
    torch.manual_seed(0)
    m = MoGEForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq)) + id_shift
    try:
        out = m(ids, labels=ids)
    except MoGEError:
        assert id_shift != 0 or seq < 2, "a valid config and in-range ids must run"
        return
    assert id_shift == 0 and torch.isfinite(out.loss)


@settings(max_examples=200, deadline=None)
@given(t=st.sampled_from([0, 1, 5]), n=st.sampled_from([0, 1, 4, 8]), m=VALUE, k=VALUE, tg=VALUE,
       which=st.sampled_from(["moge", "topk", "group_limited", "aux", "imbalance"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bfloat16]),
       scale=st.sampled_from([None, "ones", "nan", "short"]))
def test_fuzz_routing_and_metrics(t, n, m, k, tg, which, dtype, scale):
    from moge import group_limited_route
    logits = (torch.randn(t, n) * 3).to(dtype)
    rs = {None: None, "ones": torch.ones(1, n), "nan": torch.full((1, n), float("nan")),
          "short": torch.ones(1, max(n - 1, 0))}[scale]
    try:
        if which == "moge":
            w, ids = moge_route(logits, m, k, rs)
        elif which == "topk":
            w, ids = topk_route(logits, k, rs)
        elif which == "group_limited":
            w, ids = group_limited_route(logits, k, m, tg, rs)
        elif which == "aux":
            aux_loss(logits.softmax(-1) if logits.is_floating_point() else logits,
                     torch.randint(-1, max(n, 1) + 1, (t, 2)))
            return
        else:
            imbalance_score(torch.randint(0, max(n, 1) + 1, (t, 2)), n, m)
            return
    except MoGEError:
        return
    assert ids.shape[0] == t and w.shape == ids.shape and (t == 0 or (ids.min() >= 0 and ids.max() < n))
    assert not math.isnan(float(w.sum())) if t else True
