"""Smoothing: exact before rounding, eq. 10's max property, the per-expert baseline, and calibration."""

from __future__ import annotations

import copy

import pytest
import torch

from moge.config import get_config
from moge.model import MoGEForCausalLM
from moge.quant import (QuantError, apply_smoothing, calibrate, expert_aware_scale, per_expert_scales, quantize,
                        smooth_scale)


@pytest.fixture(scope="module")
def model():
    """The debug preset in float64 with outlier channels at both norms (as real LLMs have), so ``s != 1``."""
    torch.manual_seed(0)
    m = MoGEForCausalLM(get_config("debug")).double().eval()
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 25.0
    return m


@pytest.fixture(scope="module")
def rows():
    return torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("smoothing", ["expert-aware", "none"])
def test_smoothing_alone_leaves_outputs_unchanged(model, rows, smoothing):
    m = copy.deepcopy(model)
    ref = model(rows)
    calib = calibrate(m, rows, progress=False)
    done = apply_smoothing(m, calib, smoothing, alpha=0.5)
    out = m(rows)
    # float32 pieces of the model (RMSNorm statistics, router logits) bound the agreement, not the smoothing
    assert torch.allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.router_stats, ref.router_stats):
        assert torch.equal(a.expert_ids, b.expert_ids)
    if smoothing == "none":
        assert not done.folded and not done.divisors
        return
    norm = m.model.layers[0].post_attention_layernorm.weight
    assert not torch.allclose(norm, model.model.layers[0].post_attention_layernorm.weight)
    assert {"model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.experts.up", "model.layers.1.mlp.shared_expert.up_proj"} <= set(done.folded)
    s = done.folded["model.layers.0.post_attention_layernorm"]
    assert float(s[[3, 17, 40]].min()) > 3 * float(s.median())  # the outlier channels moved into the weights


def test_per_expert_divisors_undo_their_weight_scaling(model, rows):
    m = copy.deepcopy(model)
    calib = calibrate(m, rows, progress=False)
    done = apply_smoothing(m, calib, "per-expert", alpha=0.5)
    before, after = model.model.layers[0].mlp, m.model.layers[0].mlp
    assert torch.equal(before.gate.weight, after.gate.weight)  # no router term: the router is untouched
    assert torch.equal(model.model.layers[0].post_attention_layernorm.weight,
                       m.model.layers[0].post_attention_layernorm.weight)  # nothing folded into the shared norm
    s_NH = done.divisors["model.layers.0.mlp.experts"]
    x = torch.randn(5, 64, dtype=torch.float64)
    f = before.experts.intermediate_size
    for e in range(8):
        want = x @ before.experts.gate_up_proj[e, :f].T  # the gate rows carry only the input smoothing
        got = (x / s_NH[e]) @ after.experts.gate_up_proj[e, :f].T
        assert torch.allclose(got, want, rtol=1e-10)
    assert not torch.allclose(s_NH[0], s_NH[1])  # each expert its own scale
    s_sh = done.divisors["model.layers.0.mlp.shared_expert.gate_proj"]
    assert torch.allclose((x / s_sh) @ after.shared_expert.gate_proj.weight.T, x @ before.shared_expert.gate_proj.weight.T)


def test_expert_aware_scale_is_never_below_any_readers_requirement():
    g = torch.Generator().manual_seed(3)
    h, n, f, alpha = 32, 6, 8, 0.6
    act = torch.rand(h, generator=g) * torch.logspace(-2, 1, h)
    router, gate_up = torch.randn(n, h, generator=g), torch.randn(n, 2 * f, h, generator=g) * torch.rand(n, 1, 1, generator=g)
    shared = [torch.randn(12, h, generator=g), torch.randn(12, h, generator=g)]
    s, reqs = expert_aware_scale(act, router, gate_up, shared, alpha)

    def req(w):  # SmoothQuant's requirement of one reader, written out
        return act ** alpha / w.abs().amax(0) ** (1 - alpha)

    want = [req(router)] + [req(gate_up[i]) for i in range(n)] + [req(torch.cat(shared))]
    assert reqs.shape == (n + 2, h)
    for r_want, r_got in zip(want, reqs):
        assert torch.allclose(r_got, r_want, rtol=1e-5)
        assert bool((s >= r_want * (1 - 1e-6)).all())
    assert torch.allclose(s, torch.stack(want).amax(0), rtol=1e-5)  # the max, not just an upper bound
    assert torch.allclose(per_expert_scales(act.expand(n, h), gate_up, alpha), torch.stack(want[1:1 + n]), rtol=1e-5)
    assert bool((smooth_scale(torch.zeros(4), torch.zeros(4), 0.5) > 0).all())  # floored, never 0 or inf


def test_smoothing_pays_off_on_outlier_channels(model, rows):
    err = {}
    with torch.no_grad():
        ref = model(rows).logits
    for smoothing in ("expert-aware", "none"):
        q = copy.deepcopy(model).float()
        quantize(q, rows, smoothing=smoothing, act="static", progress=False)
        with torch.no_grad():
            err[smoothing] = float((q(rows).logits.double() - ref).abs().mean())
    assert err["expert-aware"] < 0.7 * err["none"]


def test_calibration_records_the_inputs_and_tops_up_rare_experts(model, rows):
    m = copy.deepcopy(model)
    captured = {}
    layer = m.model.layers[1]
    def keep(key):
        def hook(mod, args):
            captured[key] = args[0].reshape(-1, 64)
        return hook

    hk = layer.mlp.register_forward_pre_hook(keep("x"))
    hq = layer.self_attn.q_proj.register_forward_pre_hook(keep("q"))
    with torch.no_grad():
        ids = m(rows).router_stats[1].expert_ids
    hk.remove(), hq.remove()
    calib = calibrate(m, rows, batch_size=6, min_expert_tokens=50, progress=False)
    x = captured["x"]
    assert torch.allclose(calib.linears["model.layers.1.self_attn.q_proj"],
                          captured["q"].reshape(-1, 64).abs().amax(0).float())
    st = calib.moe["model.layers.1.mlp"]
    assert torch.allclose(st.input_absmax_H, x.abs().amax(0).float())
    routed = torch.stack([(ids == e).any(-1).sum() for e in range(8)])
    assert torch.equal(st.routed_tokens_N, routed)
    assert torch.equal(st.stat_tokens_N, routed.clamp(min=50))  # one batch: topped up to the minimum
    for e in range(8):  # routed tokens are a subset of each expert's statistics
        assert bool((st.expert_input_absmax_NH[e] >= x[(ids == e).any(-1)].abs().amax(0).float() - 1e-6).all())
    starved = calib.starved()["model.layers.1.mlp"]
    assert starved == [(e, int(c)) for e, c in enumerate(routed.tolist()) if c < 50] and starved


def test_bad_inputs_are_named(model, rows):
    m = copy.deepcopy(model).float()
    with pytest.raises(QuantError, match="no calibration tokens"):
        calibrate(m, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(QuantError, match="smoothing must be one of expert-aware, per-expert, none; got 'max'"):
        quantize(m, rows, smoothing="max")
    with pytest.raises(QuantError, match="act must be one of static, dynamic; got 'per-channel'"):
        quantize(m, rows, act="per-channel")
    with pytest.raises(QuantError, match=r"alpha \(migration strength\) must be in \[0, 1\], got 1.5"):
        quantize(m, rows, alpha=1.5)
    quantize(m, rows[:2], progress=False)
    with pytest.raises(QuantError, match="already quantized"):
        quantize(m, rows)
