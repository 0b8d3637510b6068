"""Experts backends in isolation: registry, ``auto`` choice, edge cases, gradients of unused experts."""

from __future__ import annotations

import pytest
import torch

from moge.experts import (SwiGLUExperts, available_backends, default_backend, eager_experts,
                          get_experts_backend, sort_by_expert)
from moge.experts import KernelChoices
from moge.experts.choice import TUNE_REPEATS

N, H, F = 6, 16, 8


def make(dtype=torch.float64):
    gen = torch.Generator().manual_seed(2)
    gu = torch.randn(N, 2 * F, H, generator=gen, dtype=dtype, requires_grad=True)
    down = torch.randn(N, H, F, generator=gen, dtype=dtype, requires_grad=True)
    return gu, down


def test_registry_and_auto():
    assert {"eager", "grouped_mm", "sorted"} <= set(available_backends())
    assert default_backend(torch.device("cpu")) == "sorted"
    assert default_backend(torch.device("cuda")) == "grouped_mm"  # pure name logic, no device touched
    # CPU: a per-call choice by pairs per expert (decode -> gemv, prefill/training -> sorted)
    assert default_backend(torch.device("cpu"), pairs_per_expert=1.0) == "gemv"
    assert default_backend(torch.device("cpu"), pairs_per_expert=64.0) == "sorted"
    assert get_experts_backend("auto", torch.device("cuda")) is get_experts_backend("grouped_mm")
    with pytest.raises(ValueError, match=r"unknown experts backend 'fast'; available: \['auto', "):
        get_experts_backend("fast")
    with pytest.raises(ValueError, match="unknown experts backend"):
        SwiGLUExperts(4, 8, 8, backend="nope")


def test_sort_by_expert_groups_pairs():
    ids = torch.tensor([[2, 0], [1, 2], [0, 2]])
    order, token, offsets = sort_by_expert(ids, 4)
    assert ids.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2, 2]
    assert token.tolist() == [0, 2, 1, 0, 1, 2]  # stable: tokens stay in order inside an expert
    assert offsets.tolist() == [2, 3, 6, 6]


@pytest.mark.parametrize("backend", available_backends())
def test_unused_experts_get_zero_gradient(backend):
    gu, down = make()
    x = torch.randn(5, H, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3]] * 5)  # experts 1, 2, 4, 5 unused
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    y = get_experts_backend(backend)(x, ids, w, gu, down)
    y.backward(torch.randn_like(y))
    for e in (1, 2, 4, 5):
        assert torch.equal(gu.grad[e], torch.zeros_like(gu.grad[e]))
        assert torch.equal(down.grad[e], torch.zeros_like(down.grad[e]))
    assert gu.grad[0].abs().sum() > 0 and down.grad[3].abs().sum() > 0
    assert w.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", available_backends())
def test_empty_batch(backend):
    gu, down = make(torch.float32)
    x = torch.zeros(0, H, requires_grad=True)
    y = get_experts_backend(backend)(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), gu, down)
    assert y.shape == (0, H)
    if y.requires_grad:  # eager returns a fresh zeros tensor when no expert ran
        y.sum().backward()
        assert x.grad.shape == (0, H)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_backend_matches_eager_across_dtypes(backend, dtype):
    gu, down = make(dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(N, generator=gen)[:3] for _ in range(9)])
    w = torch.rand(9, 3, generator=gen)  # float32 router weights, as the layer passes them
    y = get_experts_backend(backend)(x, ids, w, gu, down)
    want = eager_experts(x, ids, w, gu, down)
    assert y.dtype == dtype
    # bf16 rounds each matmul output to 8 mantissa bits, so compare relative to the output's scale
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert float((y.detach().double() - want.detach().double()).abs().max() / want.detach().double().abs().max()) < tol


def test_no_grad_forward_keeps_no_graph():
    gu, down = make(torch.float32)
    x = torch.randn(4, H)
    with torch.no_grad():
        y = get_experts_backend("sorted")(x, torch.tensor([[0, 1]] * 4), torch.rand(4, 2), gu, down)
    assert not y.requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["grouped_mm", "sorted"])
def test_cuda_backend_matches_float64_reference(backend):
    """bf16 on CUDA against the float64 result of the same (bf16-rounded) inputs: within bf16 accuracy,
    and no less accurate than the bf16 ``eager`` loop (two bf16 paths may round differently, so they
    are not compared with each other)."""
    gu, down = (t.detach().cuda().bfloat16() for t in make(torch.float32))
    x = torch.randn(64, H, device="cuda").bfloat16()
    ids = torch.randint(0, N, (64, 1), device="cuda")
    w = torch.rand(64, 1, device="cuda")
    want = eager_experts(*(t.cpu().double() for t in (x,)), ids.cpu(), w.cpu().double(), gu.cpu().double(),
                         down.cpu().double())
    got = get_experts_backend(backend)(x, ids, w, gu, down).cpu().double()
    bf16_eager = eager_experts(x, ids, w, gu, down).cpu().double()
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale)
    assert (got - want).abs().mean() <= 2 * (bf16_eager - want).abs().mean() + 1e-3 * scale


def test_segments_split_whole_experts():
    from moge.experts.sorted import _segments
    # counts 3, 0, 2, 4 with at most 5 rows a chunk: [e0 e2] then [e3]; an expert is never split
    assert _segments([3, 0, 2, 4], 5) == [(0, 5, [(0, 0, 3), (2, 3, 5)]), (5, 9, [(3, 0, 4)])]
    assert _segments([7, 1], 5) == [(0, 7, [(0, 0, 7)]), (7, 8, [(1, 0, 1)])]
    assert _segments([0, 0], 5) == []


@pytest.mark.parametrize("chunk_bytes", [1, 300])
def test_sorted_backend_in_many_chunks_matches_eager(monkeypatch, chunk_bytes):
    import moge.experts as ex
    import moge.experts.sorted as exs
    monkeypatch.setattr(exs, "_CHUNK_BYTES", chunk_bytes)  # 1 byte: one expert per chunk
    gu, down = make()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(11, H, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(N, generator=gen)[:3] for _ in range(11)])
    w = torch.rand(11, 3, generator=gen, dtype=torch.float64)
    gy = torch.randn(11, H, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (ex.sorted_experts, ex.eager_experts):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, gu, down)]
        y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
        y.backward(gy)
        grads.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["auto", "linear", "wxt"])
@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_gemv_backend_float32_fast_path_matches_eager_with_gradients(t, kernel, monkeypatch):
    """float32 on CPU takes the few-rows kernels of moge.experts.linear (float64 above takes F.linear): forward
    and backward against the eager oracle at decode sizes (T=1 is its own path), and ``auto`` picks
    it there."""
    import moge.experts as ex
    import moge.experts.linear as ml
    kernels = KernelChoices(few_rows=kernel)
    gu, down = (p.detach().float() for p in make())
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, H, generator=gen)
    ids = torch.stack([torch.randperm(N, generator=gen)[:3] for _ in range(t)])
    w = torch.rand(t, 3, generator=gen)
    gy = torch.randn(t, H, generator=gen)
    outs = []
    for fn in (ex.gemv_experts, ex.eager_experts):
        leaves = [p.clone().requires_grad_() for p in (x, w, gu, down)]
        y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3], kernels=kernels)
        y.backward(gy)
        outs.append([y.detach()] + [p.grad for p in leaves])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    import moge.experts.gemv as eg
    with torch.inference_mode():  # auto takes gemv or grouped_mm when decoding, whichever measured faster
        for _ in range(len(eg.DECODE_CANDIDATES) * TUNE_REPEATS + 1):  # the trial calls, then the chosen one
            got = get_experts_backend("auto")(x, ids, w, gu, down, kernels=kernels)
            torch.testing.assert_close(got, outs[0][0], rtol=1e-4, atol=1e-5)
        chosen = eg.decode_backend(x, ids, gu, down, kernels)
        assert chosen in eg.DECODE_CANDIDATES
        # gemv's own few-rows kernels may still be on trial (they alternate, rounding differently), so
        # settle them before asking auto to give bitwise the chosen backend's result
        for _ in range(len(ml.KERNELS) * TUNE_REPEATS):
            want = get_experts_backend(chosen)(x, ids, w, gu, down, kernels=kernels)
        torch.testing.assert_close(get_experts_backend("auto")(x, ids, w, gu, down, kernels=kernels), want,
                                   rtol=0, atol=0)


def test_decode_backend_is_measured_on_the_first_real_calls(monkeypatch):
    import moge.experts.gemv as eg
    kernels = KernelChoices()  # a fresh owner: nothing measured yet
    calls = []
    for name, real in list(eg.DECODE_CANDIDATES.items()):
        monkeypatch.setitem(eg.DECODE_CANDIDATES, name,
                            lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    gu, down = (p.detach().float() for p in make())
    x, ids, w = torch.randn(2, H), torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2)
    want = eager_experts(x, ids, w, gu, down)
    n = TUNE_REPEATS * len(eg.DECODE_CANDIDATES)
    with torch.inference_mode():
        for _ in range(n):  # 3 timed real calls each, alternating; each returns the real result
            assert eg.decode_backend(x, ids, gu, down, kernels) is None
            torch.testing.assert_close(eg.decode_experts(x, ids, w, gu, down, kernels), want, rtol=1e-4, atol=1e-5)
        assert sorted(calls) == sorted(list(eg.DECODE_CANDIDATES) * TUNE_REPEATS)
        first = eg.decode_backend(x, ids, gu, down, kernels)
        assert first in eg.DECODE_CANDIDATES
        eg.decode_experts(x, ids, w, gu, down, kernels)
        assert calls[n:] == [first]  # kept, not re-measured
        assert eg.decode_backend(x, ids, gu, down, None) == "gemv"  # no owner: no measuring
