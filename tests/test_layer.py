"""MoGELayer parity: every registered experts backend vs ``eager`` and vs the float64 spec reference.

Forward outputs and the gradients of every parameter (router ``gate.weight``, ``router_scale``, the
stacked expert weights, the shared expert) and of the input are compared, for the three routers.
Backends are parametrised from ``available_backends()`` so a newly registered one is tested
automatically. Tolerances: backend vs ``eager`` in float64 is 1e-10 (same routing, only the matmul
order differs); vs the reference it is 1e-5 relative because the layer's router math is float32 by spec
while the reference is float64 throughout.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from moge.experts import available_backends
from moge.model.moe import MoGELayer

H, N, M, K, F, FS, T = 16, 8, 4, 4, 6, 10, 7
ROUTERS = ["moge", "topk", "group_limited"]


def make_layer(router: str, dtype=torch.float64, shared: bool = True) -> MoGELayer:
    gen = torch.Generator().manual_seed(5)
    layer = MoGELayer(H, N, K, F, FS if shared else 0, num_groups=M, router=router, topk_groups=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        layer.router_scale.copy_(0.5 + torch.rand(1, N, generator=gen))  # not ones: must really be applied
    return layer.to(dtype)


def run(layer: MoGELayer, x: torch.Tensor, gy: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_()
    y, _ = layer(xg, backend=backend)
    y.backward(gy)
    out = {"y": y.detach(), "x": xg.grad}
    out.update({name: p.grad for name, p in layer.named_parameters()})
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def reference_grads(layer: MoGELayer, x: torch.Tensor, gy: torch.Tensor, router: str) -> dict[str, torch.Tensor]:
    """Forward + backward of the float64 reference on copies of the layer's parameters."""
    leaf = {n: p.detach().double().clone().requires_grad_() for n, p in layer.named_parameters()}
    gu = leaf["experts.gate_up_proj"]
    params = {"gate": leaf["gate.weight"], "router_scale": leaf["router_scale"], "w_gate": gu[:, :F],
              "w_up": gu[:, F:], "w_down": leaf["experts.down_proj"]}
    if layer.shared_expert is not None:
        params.update(shared_gate=leaf["shared_expert.gate_proj.weight"], shared_up=leaf["shared_expert.up_proj.weight"],
                      shared_down=leaf["shared_expert.down_proj.weight"])
    xg = x.detach().double().clone().requires_grad_()
    y = ref.layer_forward(xg.reshape(-1, H), params, router, K, M, topk_groups=2).reshape(x.shape)
    y.backward(gy.double())
    out = {"y": y.detach(), "x": xg.grad}
    out.update({n: t.grad for n, t in leaf.items()})
    return out


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("backend", available_backends())
def test_backend_matches_eager_and_reference_float64(backend, router):
    layer = make_layer(router)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    gy = torch.randn(T, H, generator=gen, dtype=torch.float64)
    got, oracle, want = run(layer, x, gy, backend), run(layer, x, gy, "eager"), reference_grads(layer, x, gy, router)
    assert set(got) == {"y", "x", "gate.weight", "router_scale", "experts.gate_up_proj", "experts.down_proj",
                        "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                        "shared_expert.down_proj.weight"}
    for name in got:
        assert got[name] is not None, f"{backend}: no gradient for {name}"
        assert got[name].dtype == torch.float64
        assert rel_err(got[name], oracle[name]) < 1e-10, f"{backend} vs eager: {name}"
        assert rel_err(got[name], want[name]) < 1e-5, f"{backend} vs reference: {name}"


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("backend", available_backends())
def test_backend_matches_eager_float32_with_leading_dims(backend, router):
    layer = make_layer(router, torch.float32, shared=False)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, H, generator=gen)
    gy = torch.randn(2, 5, H, generator=gen)
    got, oracle = run(layer, x, gy, backend), run(layer, x, gy, "eager")
    assert got["y"].shape == (2, 5, H)
    for name in got:
        assert rel_err(got[name], oracle[name]) < 1e-5, f"{backend} vs eager: {name}"


@pytest.mark.parametrize("backend", available_backends())
def test_backend_accepts_expanded_grad(backend):
    # y.sum().backward() hands the layer a stride-0 gradient; grouped_mm's backward used to reject it.
    layer = make_layer("moge", torch.float32)
    x = torch.randn(6, H, requires_grad=True)
    layer(x, backend=backend)[0].sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_layer_forward_matches_reference_without_shared_expert():
    layer = make_layer("moge", shared=False)
    x = torch.randn(T, H, dtype=torch.float64)
    want = reference_grads(layer, x, torch.ones(T, H, dtype=torch.float64), "moge")["y"]
    assert rel_err(layer(x)[0].detach(), want) < 1e-5


def test_stats_report_balanced_groups_for_moge():
    layer = make_layer("moge", torch.float32)
    _, stats = layer(torch.randn(11, H))
    assert stats.group_loads.tolist() == [11] * M
    assert int(stats.expert_counts.sum()) == 11 * K
    assert stats.num_tokens == 11


def test_layer_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"num_experts=10 is not divisible by num_groups=4"):
        MoGELayer(8, 10, 4, 4, num_groups=4)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=6 = num_groups=4 x K'"):
        MoGELayer(8, 8, 6, 4, num_groups=4)
    with pytest.raises(ValueError, match=r"router must be one of"):
        MoGELayer(8, 8, 4, 4, router="hash")


def test_router_logits_stay_float32_under_autocast():
    """bf16 autocast (the trainer's CUDA mode) must not lower the router's precision (spec 2.1)."""
    torch.manual_seed(0)
    layer = MoGELayer(hidden_size=32, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16, num_groups=4)
    x = torch.randn(64, 32)
    ref = layer.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.route(x)
    assert r.logits.dtype == torch.float32 and r.scores.dtype == torch.float32
    torch.testing.assert_close(r.logits, ref.logits, rtol=0, atol=0)
    assert torch.equal(r.expert_ids, ref.expert_ids)
