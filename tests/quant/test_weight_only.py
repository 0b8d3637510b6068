"""Weight-only int8 / int4: the stored layout and arithmetic against references written here from the
formulas (docs/quantization.md), torch's kernels against the dequantize oracle, the experts backends,
and a whole model against a float model holding the dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import single_thread  # noqa: F401 (fixture)
from moge.config import get_config
from moge.experts import SwiGLUExperts, available_backends
from moge.model import MoGEForCausalLM
from moge.quant import (QuantError, WeightOnlyExperts, WeightOnlyLinear, default_group_size, dequantize_weight,
                        is_quantized, pack_int4, quantize_weight_only, quantize_weights, set_weight_only,
                        unpack_int4, weight_kinds)

pytestmark = pytest.mark.usefixtures("single_thread")
gen = torch.Generator().manual_seed(11)


def randn(*shape):
    return torch.randn(*shape, generator=gen)


def spec_dequant(qweight, scale, bits):
    """``w[o, i] = q[o, i] * scale[o, i // G]`` with int4 unpacked by hand: low nibble = even column, ``u - 8``."""
    if bits == 4:
        u = qweight.to(torch.int32)
        q = torch.empty(*qweight.shape[:-1], qweight.shape[-1] * 2, dtype=torch.int32)
        q[..., 0::2], q[..., 1::2] = (u & 15) - 8, (u >> 4) - 8
    else:
        q = qweight.to(torch.int32)
    g = q.shape[-1] // scale.shape[-1]
    return q.double() * scale.double().repeat_interleave(g, -1)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128)])
def test_quantization_is_within_half_a_step_of_every_weight(bits, group):
    w = randn(3, 32, 256) * torch.logspace(-3, 1, 32)[:, None]  # rows 4 decades apart
    q, s = quantize_weight_only(w, bits, group)
    g = 256 if bits == 8 else group
    assert s.shape == (3, 32, 256 // g) and s.dtype == torch.float32
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and q.shape == (3, 32, 256 if bits == 8 else 128)
    deq = spec_dequant(q, s, bits)
    err = (deq - w.double()).abs()
    assert bool((err <= s.double().repeat_interleave(g, -1) / 2 * (1 + 1e-5)).all())
    assert torch.allclose(dequantize_weight(q, s).double(), deq, rtol=1e-6, atol=0)  # the library's dequantize
    if bits == 4:
        vals = unpack_int4(q)
        assert int(vals.min()) == -8 and int(vals.max()) <= 7
    else:
        assert int(q.abs().max()) == 127


def test_int4_packing_order_low_nibble_first():
    q = torch.tensor([[-8, 7, 0, -1, 3, -3]], dtype=torch.int8)
    p = pack_int4(q)
    assert p.tolist() == [[0 | (15 << 4), 8 | (7 << 4), 11 | (5 << 4)]]
    assert torch.equal(unpack_int4(p), q)


def _oracle(lin: WeightOnlyLinear, x, e=None):
    """The module's formula, written out: ``act(act(x) @ (q * act(scale))^T)`` in float64 then rounded."""
    act = lin.act_dtype or x.dtype
    q, s = (lin.qweight, lin.weight_scale) if e is None else (lin.qweight[e], lin.weight_scale[e])
    w = spec_dequant(q, s.to(act).double(), lin.bits)
    y = (x.to(act).double() @ w.T).to(act).to(x.dtype)
    return y + (lin.bias if e is None else lin.bias[e]).to(x.dtype) if lin.bias is not None else y


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_kernel_equals_dequantize_oracle(bits, group, rows):
    w, b, x = randn(4, 48, 128), randn(4, 48), randn(rows, 128)
    lin = WeightOnlyLinear.quantize(w, b, bits, group, act_dtype=None)
    for compute in ("kernel", "dequant"):
        lin.compute = compute
        # float32 activations: the same float32 product up to summation order
        assert torch.allclose(lin.matmul(x, 2), _oracle(lin, x, 2), rtol=1e-5, atol=1e-4), compute
    lin.act_dtype = torch.bfloat16  # the default: activations and scales in bf16, result rounded to bf16
    ref = _oracle(lin, x, 1)
    for compute in ("kernel", "dequant"):
        lin.compute = compute
        assert torch.allclose(lin.matmul(x, 1), ref, rtol=2 ** -7, atol=1e-2), compute
    # the gate weights of expert rows scale the output rows
    r = torch.rand(rows, 1, generator=gen)
    assert torch.allclose(lin.matmul(x, 1, r), lin.matmul(x, 1) * r, rtol=1e-6, atol=1e-6)
    # close to the float weight it came from
    lin.act_dtype, lin.compute = None, "auto"
    y_fp = x @ w[3].T + b[3]
    assert (lin.matmul(x, 3) - y_fp).abs().max() < (0.02 if bits == 8 else 0.3) * y_fp.abs().max()


def test_shapes_without_a_kernel_use_the_oracle_and_kernel_says_why():
    lin = WeightOnlyLinear.quantize(randn(40, 64), None, 4, 32)  # 40 outputs: the int4 kernel wants multiples of 16
    x = randn(3, 64)
    assert lin.resolved_compute(x.device, torch.bfloat16) == "dequant"
    assert torch.allclose(lin(x), _oracle(lin, x), rtol=2 ** -7, atol=1e-2)
    lin.compute = "kernel"
    with pytest.raises(QuantError, match=r"no int4 weight-only kernel for torch.bfloat16 activations on cpu \(I=64, O=40"):
        lin(x)
    # torch's int8 kernel reads inputs in blocks of 16 unchecked (I=24 crashed the process): the oracle takes it
    lin8 = WeightOnlyLinear.quantize(randn(32, 24), None, 8)
    x24 = randn(3, 24)
    assert lin8.resolved_compute(x24.device, torch.bfloat16) == "dequant"
    assert torch.allclose(lin8(x24), _oracle(lin8, x24), rtol=2 ** -7, atol=1e-2)
    x64 = x.double()  # no kernel for float64: the oracle, in float64
    lin.compute, lin.act_dtype = "auto", None
    assert lin(x64).dtype == torch.float64 and torch.allclose(lin(x64), _oracle(lin, x64), rtol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "sorted", "gemv", "grouped_mm", "auto"])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_every_experts_backend_runs_weight_only_experts(backend, bits, group):
    if backend not in available_backends() + ["auto"]:
        pytest.skip(f"{backend} not registered")
    torch.manual_seed(3)
    fp = SwiGLUExperts(8, 64, 32)
    q = WeightOnlyExperts.quantize(fp, bits, group, act_dtype=None)
    oracle = SwiGLUExperts(8, 64, 32)  # float experts holding the dequantized weights
    with torch.no_grad():
        oracle.gate_up_proj.copy_(q.gate_up_proj.dequantized_weight())
        oracle.down_proj.copy_(q.down_proj.dequantized_weight())
    for t in (1, 6):
        x = randn(t, 64)
        ids = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(t)])
        wts = torch.softmax(randn(t, 4), -1)
        with torch.inference_mode():  # decode sizes: auto may take gemv / grouped_mm, which fall back to sorted
            y = q(x, ids, wts, backend=backend)
            want = oracle(x, ids, wts, backend="eager")
            y_fp = fp(x, ids, wts, backend="eager")
        assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
        assert (y - y_fp).abs().max() < (0.03 if bits == 8 else 0.3) * y_fp.abs().max()


def _dequantized_float_model(q: nn.Module, fp: nn.Module) -> nn.Module:
    """``fp``'s architecture holding ``q``'s dequantized weights: the oracle of a whole quantized model."""
    oracle = copy.deepcopy(fp)
    qm = dict(q.named_modules())
    with torch.no_grad():
        for name, m in oracle.named_modules():
            src = qm.get(name)
            if isinstance(src, WeightOnlyLinear) and isinstance(m, nn.Linear):
                m.weight.copy_(src.dequantized_weight())
            elif isinstance(src, WeightOnlyExperts):
                m.gate_up_proj.copy_(src.gate_up_proj.dequantized_weight())
                m.down_proj.copy_(src.down_proj.dequantized_weight())
    return oracle


@pytest.mark.parametrize("bits,head", [(8, True), (4, False)])
def test_model_logits_equal_the_dequantized_oracle_and_the_router_stays_float(bits, head):
    torch.manual_seed(0)
    fp = MoGEForCausalLM(get_config("debug")).eval()
    q = copy.deepcopy(fp)
    assert quantize_weights(q, bits, head=head) == (None if bits == 8 else 32)
    assert weight_kinds(q) == {f"int{bits}"} and is_quantized(q)
    for layer in q.model.layers:
        assert type(layer.self_attn.q_proj) is WeightOnlyLinear
        if hasattr(layer.mlp, "gate"):
            assert type(layer.mlp.gate) is nn.Linear and layer.mlp.gate.weight.dtype == torch.float32
            assert isinstance(layer.mlp.experts, WeightOnlyExperts)
    assert q.model.embed_tokens.weight.dtype == torch.float32
    assert isinstance(q.lm_head, WeightOnlyLinear) == head
    ids = torch.randint(3, 512, (2, 12), generator=gen)
    oracle = _dequantized_float_model(q, fp)
    with torch.no_grad():
        a, o = fp(input_ids=ids), oracle(input_ids=ids)
        set_weight_only(q, "kernel", "float32")
        k = q(input_ids=ids)
        set_weight_only(q, "auto", "bfloat16")  # the default
        kb = q(input_ids=ids)
    assert torch.allclose(k.logits, o.logits, rtol=1e-4, atol=1e-4)
    for sa, sb in zip(k.router_stats, o.router_stats):  # same routing as the oracle
        if sa is not None:
            assert torch.equal(sa.expert_ids, sb.expert_ids)
    assert (kb.logits - o.logits).abs().max() < 0.02 * o.logits.abs().max()
    assert (k.logits - a.logits).abs().max() < (0.02 if bits == 8 else 0.25) * a.logits.abs().max()


def test_group_size_and_target_errors_are_named():
    torch.manual_seed(0)
    m = MoGEForCausalLM(get_config("tiny", vocab_size=64)).eval()
    assert default_group_size(m) == 32  # the experts' input F = 96: 128 and 64 do not divide it
    with pytest.raises(QuantError, match=r"group size 64 does not divide its input dim 96"):
        quantize_weights(copy.deepcopy(m), 4, 64)
    assert not is_quantized(m)
    with pytest.raises(QuantError, match=r"int4 group size must be one of \(32, 64, 128, 256\), got 48"):
        quantize_weights(copy.deepcopy(m), 4, 48)
    with pytest.raises(QuantError, match=r"int8 weights have one scale per output channel; group size 32"):
        quantize_weights(copy.deepcopy(m), 8, 32)
    with pytest.raises(QuantError, match=r"bits must be 8 or 4, got 3"):
        quantize_weights(copy.deepcopy(m), 3)
    tied = MoGEForCausalLM(get_config("debug", tie_word_embeddings=True))
    with pytest.raises(QuantError, match=r"the output head is tied to the embedding"):
        quantize_weights(tied, 8, head=True)
    q = copy.deepcopy(m)
    quantize_weights(q, 8)
    with pytest.raises(QuantError, match=r"already quantized"):
        quantize_weights(q, 4)
    with pytest.raises(QuantError, match=r"compute must be one of auto, kernel, dequant"):
        set_weight_only(q, "int8")
