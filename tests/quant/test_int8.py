"""W8A8 arithmetic and the int8 modules against references written here from the formulas (docs/design.md section 7.4)."""

from __future__ import annotations

import pytest
import torch

from moge.experts import SwiGLUExperts, available_backends, eager_experts
from moge.quant import Int8Linear, QuantError, QuantizedExperts, quantize_input, quantize_weight, set_compute

gen = torch.Generator().manual_seed(7)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def spec_linear(x, wq, w_scale, in_scale, in_offset, quant_bias):
    """Ascend's static W8A8: ``deq * (clamp(round(x / s) + off) @ W.T + quant_bias)``, deq = s * w_scale."""
    xq = (torch.round(x / in_scale) + in_offset).clamp(-128, 127)
    return (xq @ wq.double().T + quant_bias.double()) * (in_scale * w_scale.double())


def test_weight_quantization_error_is_half_a_step_per_output_channel():
    w = randn(24, 40) * torch.logspace(-3, 2, 24, dtype=torch.float64)[:, None]  # rows 5 decades apart
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and s.shape == (24,)
    err = (q.double() * s.double()[:, None] - w).abs()
    assert bool((err <= s.double()[:, None] / 2 * (1 + 1e-6)).all())
    peak = w.abs().argmax(1)
    rows = torch.arange(24)
    assert bool((err[rows, peak] <= 1e-6 * w.abs()[rows, peak]).all())  # exact up to the float32 scale
    # one scale per channel is what keeps the small rows: a per-tensor scale would zero them out
    assert bool((q[:8] != 0).any(1).all())


def test_activation_quantization_static_saturates_dynamic_follows_each_row():
    x = randn(6, 32, scale=3.0)
    s = torch.tensor([0.02])
    q, s_r = quantize_input(x, s)
    inside = x.abs() <= 127 * 0.02
    assert bool(((q.double() * 0.02 - x).abs()[inside] <= 0.01 + 1e-12).all())
    assert set(q[x > 127 * 0.02].tolist()) <= {127} and set(q[x < -128.5 * 0.02].tolist()) <= {-128}
    q5, _ = quantize_input(x, s, torch.tensor([5.0]))
    assert torch.equal(q5.long(), (torch.round(x / 0.02) + 5).clamp(-128, 127).long())
    qd, sd = quantize_input(x, None)
    assert torch.allclose(sd.squeeze(1), x.abs().amax(1) / 127)
    assert bool(((qd.double() * sd - x).abs() <= sd / 2 + 1e-12).all())
    assert qd.abs().amax(1).tolist() == [127] * 6


@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_int8_path_equals_dequantize_path_and_the_formula(act):
    w, b, x = randn(48, 64), randn(48), randn(10, 64)
    m = Int8Linear.quantize(w, b, act, x.abs().amax(0))
    y_int = set_compute(m, "int8")(x)
    y_deq = set_compute(m, "dequant")(x)
    assert torch.allclose(y_int, y_deq, rtol=1e-12, atol=1e-12)
    ref = x @ w.T + b
    assert (y_int - ref).abs().max() < 0.02 * ref.abs().max()  # int8 error, not an exact match
    if act == "static":
        assert torch.allclose(y_int, spec_linear(x, m.weight, m.weight_scale, m.input_scale, m.input_offset,
                                                 m.quant_bias), rtol=1e-12, atol=1e-12)
        # quant_bias is the float bias in accumulator units
        assert torch.allclose(m.quant_bias.double() * m.deq_scale().double(), b, atol=float(m.deq_scale().max()))


def test_zero_point_is_honoured_on_both_paths():
    w, x = randn(16, 32), randn(5, 32, scale=0.5)
    m = Int8Linear.quantize(w, None, "static", x.abs().amax(0) * 1.2)
    m.input_offset.fill_(7.0)
    m.quant_bias.sub_(7 * m.weight.int().sum(1))  # Ascend folds the zero-point correction into quant_bias
    y = set_compute(m, "int8")(x)
    assert torch.allclose(y, set_compute(m, "dequant")(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(y, spec_linear(x, m.weight, m.weight_scale, m.input_scale, 7.0, m.quant_bias), atol=1e-12)


@pytest.mark.parametrize("act", ["static", "dynamic"])
def test_stacked_matmul_takes_an_expert_and_a_row_scale(act):
    w, x, r = randn(3, 12, 20), randn(6, 20), torch.rand(6, 1, generator=gen, dtype=torch.float64)
    m = Int8Linear.quantize(w, None, act, x.abs().amax(0).expand(3, 20))
    assert m.shape == (3, 12, 20)
    for e in range(3):
        single = Int8Linear.quantize(w[e], None, act, x.abs().amax(0))
        y = m.matmul(x, e, r)
        assert torch.allclose(y, r * single(x), rtol=1e-12, atol=1e-12)
        assert torch.allclose(y, set_compute(m, "dequant").matmul(x, e, r), rtol=1e-12, atol=1e-12)
        set_compute(m, "auto")
    with pytest.raises(QuantError, match="through an experts backend"):
        m(x)


def reference_quantized_experts(x, ids, w, qe: QuantizedExperts):
    """Token by token: quantize with the experts' scales, dequantize, SwiGLU, quantize again, gate weight after."""
    gu, dn = qe.gate_up_proj, qe.down_proj
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            s1 = float(gu.input_scale[e]) if gu.act == "static" else float(x[t].abs().max()) / 127
            h = (torch.round(x[t] / s1).clamp(-128, 127) * s1) @ (gu.weight[e].double() * gu.weight_scale[e, :, None]).T
            g, u = h.chunk(2)
            a = torch.nn.functional.silu(g) * u
            s2 = float(dn.input_scale[e]) if dn.act == "static" else float(a.abs().max()) / 127
            out = (torch.round(a / s2).clamp(-128, 127) * s2) @ (dn.weight[e].double() * dn.weight_scale[e, :, None]).T
            y[t] += w[t, slot] * out
    return y


@pytest.mark.parametrize("act", ["static", "dynamic"])
@pytest.mark.parametrize("backend", available_backends())
def test_quantized_experts_run_by_every_backend_match_a_reference_loop(backend, act):
    n, h, f, t = 6, 16, 8, 9
    experts = SwiGLUExperts(n, h, f).double()
    x, ids = randn(t, h), torch.randint(0, n, (t, 2), generator=gen)
    w = torch.rand(t, 2, generator=gen, dtype=torch.float64)
    fp = eager_experts(x, ids, w, experts.gate_up_proj.detach(), experts.down_proj.detach())
    hidden = torch.nn.functional.silu(x @ experts.gate_up_proj[:, :f].detach().transpose(1, 2)) \
        * (x @ experts.gate_up_proj[:, f:].detach().transpose(1, 2))
    qe = QuantizedExperts.quantize(experts, act, x.abs().amax().expand(n), hidden.abs().amax().expand(n))
    ref = reference_quantized_experts(x, ids, w, qe)
    y = qe(x, ids, w, backend=backend)
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(set_compute(qe, "dequant")(x, ids, w, backend=backend), ref, rtol=1e-10, atol=1e-10)
    assert (y - fp).abs().max() < 0.05 * fp.abs().max()


def test_bad_options_are_named():
    with pytest.raises(QuantError, match="act must be one of static, dynamic; got 'int4'"):
        Int8Linear(4, 4, act="int4")
    with pytest.raises(QuantError, match="compute must be one of auto, int8, dequant"):
        Int8Linear(4, 4, compute="fast")
    with pytest.raises(QuantError, match="static activation quantization needs calibrated input maxima"):
        Int8Linear.quantize(randn(4, 4), act="static")


@pytest.mark.cuda
def test_cuda_int8_matches_the_cpu_result():
    w, b, x = randn(64, 128).float(), randn(64).float(), randn(5, 128).float()  # 5 rows: padded to 17+
    m = Int8Linear.quantize(w, b, "static", x.abs().amax(0))
    cpu = m(x)
    gpu = m.cuda()(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-5, atol=1e-5)
