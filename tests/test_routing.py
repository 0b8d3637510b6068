"""Routing rules against the float64 spec reference, plus properties, ties, the aux loss and bad input.

Tolerance policy: the spec says router math is float32 ("compute in float32"), and the library does
cast logits to float32 before the softmax even for float64 input. So selected ids are compared
*exactly* with the float64 reference (inputs are built so no two scores are within float32 rounding of
each other, except where a test builds exact ties on purpose), while weights are compared with a
float32-sized tolerance (rtol 1e-6, atol 1e-7), not 1e-12: a 1e-12 match would require float64 router
math, which the spec rules out. Exactness of the weighting rule itself (weight == score x scale, no
renormalisation) is checked bit-for-bit against the module's own float32 scores.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from moge.metrics import imbalance_score
from moge.routing import (aux_loss, group_limited_route, group_limited_select, moge_route, moge_select,
                          router_scores, topk_route)

W_TOL = dict(rtol=1e-6, atol=1e-7)


def distinct_logits(t: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Logits whose per-row values are at least 0.05 apart, so float32 scores have no near-ties."""
    perm_TN = torch.stack([torch.randperm(n, generator=gen) for _ in range(t)]).double()
    return perm_TN * 0.05 + torch.randn(t, 1, generator=gen, dtype=torch.float64)


def random_scale(n: int, gen: torch.Generator) -> torch.Tensor:
    return 0.5 + torch.rand(1, n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("n,m,kp", [(8, 4, 1), (16, 4, 2), (64, 8, 1), (12, 3, 4), (6, 1, 3)])
def test_moge_matches_reference(n, m, kp):
    gen = torch.Generator().manual_seed(n * 100 + m * 10 + kp)
    logits = distinct_logits(10, n, gen)
    scale = random_scale(n, gen)
    w, ids = moge_route(logits, m, kp, scale)
    _, w_ref, ids_ref = ref.route(logits, "moge", m * kp, m, router_scale=scale)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w.double(), w_ref, **W_TOL)


@pytest.mark.parametrize("n,k", [(8, 2), (16, 5), (64, 8)])
def test_topk_matches_reference(n, k):
    gen = torch.Generator().manual_seed(n + k)
    logits = distinct_logits(10, n, gen)
    scale = random_scale(n, gen)
    w, ids = topk_route(logits, k, scale)
    _, w_ref, ids_ref = ref.route(logits, "topk", k, 1, router_scale=scale)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w.double(), w_ref, **W_TOL)


@pytest.mark.parametrize("n,m,k,tg", [(16, 4, 4, 2), (64, 8, 8, 4), (12, 4, 3, 1), (8, 4, 6, 3)])
def test_group_limited_matches_reference(n, m, k, tg):
    gen = torch.Generator().manual_seed(n + m + k + tg)
    logits = distinct_logits(10, n, gen)
    scale = random_scale(n, gen)
    w, ids = group_limited_route(logits, k, m, tg, scale)
    _, w_ref, ids_ref = ref.route(logits, "group_limited", k, m, tg, router_scale=scale)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w.double(), w_ref, **W_TOL)


def test_router_math_is_float32_even_for_float64_logits():
    logits = torch.randn(4, 8, dtype=torch.float64)
    assert router_scores(logits).dtype == torch.float32
    w, _ = moge_route(logits, 4, 1)
    assert w.dtype == torch.float32
    torch.testing.assert_close(router_scores(logits), torch.softmax(logits.float(), -1), rtol=0, atol=0)


def test_order_is_group_major_descending_within_group():
    # One token, N=8, M=2, K'=2: group 0 = experts 0..3, group 1 = experts 4..7.
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0, 0.0, 4.0, 1.0]])
    _, ids = moge_route(logits, 2, 2)
    # Group 1 holds the global best (5.0), but group 0's picks still come first.
    assert ids.tolist() == [[1, 2, 4, 6]]


def test_exact_ties_go_to_lower_expert_id():
    zeros = torch.zeros(3, 8)
    assert moge_route(zeros, 4, 1)[1].tolist() == [[0, 2, 4, 6]] * 3
    assert moge_route(zeros, 2, 3)[1].tolist() == [[0, 1, 2, 4, 5, 6]] * 3
    assert topk_route(zeros, 3)[1].tolist() == [[0, 1, 2]] * 3
    # Ties mixed with distinct values: 7 appears at experts 1, 2, 5, 7.
    row = torch.tensor([[0.0, 7.0, 7.0, 1.0, 2.0, 7.0, 3.0, 7.0]])
    assert moge_route(row, 2, 2)[1].tolist() == [[1, 2, 5, 7]]
    assert topk_route(row, 3)[1].tolist() == [[1, 2, 5]]
    assert moge_route(row, 4, 1)[1].tolist() == [[1, 2, 5, 7]]
    # Tied groups under group-limited routing go to the lower group too.
    assert group_limited_route(zeros, 2, 4, 1)[1].tolist() == [[0, 1]] * 3
    # Reference agrees on the tie rule.
    assert torch.equal(moge_route(row, 2, 2)[1], ref.route(row, "moge", 4, 2)[2])


def test_router_scale_applied_and_no_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 1.0]])
    scale = torch.tensor([[2.0, 3.0, 0.5, 4.0]])
    s = torch.softmax(logits, -1)
    w, ids = moge_route(logits, 2, 1, scale)
    assert ids.tolist() == [[0, 2], [1, 2]]
    expected = torch.stack([s[0, [0, 2]] * scale[0, [0, 2]], s[1, [1, 2]] * scale[0, [1, 2]]])
    torch.testing.assert_close(w, expected, rtol=0, atol=0)
    w1, _ = moge_route(logits, 2, 1)
    assert (w1.sum(-1) < 1).all()  # chosen scores are not renormalised to sum to 1


def test_moge_with_one_group_is_topk():
    gen = torch.Generator().manual_seed(7)
    logits = distinct_logits(12, 16, gen).float()
    scale = random_scale(16, gen).float()
    for k in (1, 3, 16):
        wm, im = moge_route(logits, 1, k, scale)
        wt, it = topk_route(logits, k, scale)
        assert torch.equal(im, it) and torch.equal(wm, wt)


# ---- properties ------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 24)).flatmap(
    lambda mgt: st.tuples(st.just(mgt[0]), st.just(mgt[1]), st.integers(1, mgt[1]), st.just(mgt[2])))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_moge_properties(shape, seed, ties):
    m, g, kp, t = shape
    n = m * g
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n, generator=gen)
    if ties:  # coarse values make many exact ties
        logits = logits.round()
    scale = 0.5 + torch.rand(1, n, generator=gen)
    scores = router_scores(logits)
    w, ids = moge_select(scores, m, kp, scale)
    assert ids.shape == (t, m * kp)
    group_TMK = ids.view(t, m, kp) // g
    # exactly K' experts in every group, in group-major order, all distinct
    assert torch.equal(group_TMK, torch.arange(m).view(1, m, 1).expand(t, m, kp))
    assert all(len(set(row)) == m * kp for row in ids.tolist())
    # each group's picks are its K' best scores, descending
    picked = scores.gather(1, ids).view(t, m, kp)
    assert (picked[..., :-1] >= picked[..., 1:]).all()
    kth_best = scores.view(t, m, g).sort(-1, descending=True).values[..., kp - 1]
    assert torch.equal(picked[..., -1], kth_best)
    # weight == score x scale exactly, and device balance is perfect
    assert torch.equal(w, scores.gather(1, ids) * scale[0][ids])
    assert imbalance_score(ids, n, m) == 0.0


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), g=st.integers(1, 5), t=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_group_limited_properties(m, g, t, seed, data):
    n = m * g
    tg = data.draw(st.integers(1, m))
    k = data.draw(st.integers(1, tg * g))
    gen = torch.Generator().manual_seed(seed)
    scores = router_scores(torch.randn(t, n, generator=gen))
    scale = 0.5 + torch.rand(1, n, generator=gen)
    w, ids = group_limited_select(scores, k, m, tg, scale)
    assert all(len(set(row)) == k for row in ids.tolist())
    # picks come from at most topk_groups groups ...
    assert all(len({e // g for e in row}) <= tg for row in ids.tolist())
    # ... and those are the groups with the best group scores
    per_group = min(g, max(1, k // tg))
    gscore = scores.view(t, m, g).topk(per_group, -1).values.sum(-1)
    kept = gscore.sort(dim=-1, descending=True, stable=True).indices[:, :tg]
    for row, keep in zip(ids.tolist(), kept.tolist()):
        assert {e // g for e in row} <= set(keep)
    assert torch.equal(w, scores.gather(1, ids) * scale[0][ids])


# ---- auxiliary loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["moge", "topk"])
def test_aux_loss_matches_reference(router):
    gen = torch.Generator().manual_seed(3)
    logits = distinct_logits(20, 16, gen)
    scores = router_scores(logits)
    _, ids = moge_select(scores, 4, 2) if router == "moge" else (None, scores.topk(8, -1).indices)
    got = aux_loss(scores, ids, alpha=0.37)
    want = ref.aux_loss(ref.softmax64(logits), ids, alpha=0.37)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_aux_loss_is_alpha_on_uniform_routing():
    t, n, k = 8, 8, 2
    scores = torch.full((t, n), 1.0 / n)
    ids = torch.tensor([[(2 * i) % n, (2 * i + 1) % n] for i in range(t)])  # every expert chosen twice
    assert torch.bincount(ids.reshape(-1), minlength=n).tolist() == [2] * n
    for alpha in (1.0, 0.001):
        torch.testing.assert_close(aux_loss(scores, ids, alpha), torch.tensor(alpha), rtol=1e-6, atol=0)
    # Collapsed routing (all mass and all picks on experts 0, 2, 4, 6) costs twice the balanced value.
    logits = torch.zeros(t, n)
    logits[:, ::2] = 30.0
    scores_c = router_scores(logits)
    _, ids_c = moge_select(scores_c, 4, 1)
    assert ids_c.tolist() == [[0, 2, 4, 6]] * t
    assert float(aux_loss(scores_c, ids_c, 1.0)) == pytest.approx(2.0, rel=1e-5)


def test_aux_loss_gradient_flows_through_p_only():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(12, 6, generator=gen)
    w_gate = torch.randn(8, 6, generator=gen, requires_grad=True)
    scores = router_scores(x @ w_gate.T)
    _, ids = moge_select(scores, 4, 1)
    assert not ids.requires_grad
    loss = aux_loss(scores, ids, alpha=0.5)
    (grad,) = torch.autograd.grad(loss, w_gate)
    # Same loss with f_i frozen as constants: gradient must match (f has no gradient path).
    f_N = torch.bincount(ids.reshape(-1), minlength=8).double() * (8 / (4 * 12))
    w64 = w_gate.detach().double().requires_grad_()
    p_N = ref.softmax64(x.double() @ w64.T).mean(0)
    (grad_ref,) = torch.autograd.grad(0.5 * (f_N * p_N).sum(), w64)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-7)
    # d loss / d scores is alpha * f_i / T for every token: p is the only path
    s = scores.detach().requires_grad_()
    (gs,) = torch.autograd.grad(aux_loss(s, ids, 0.5), s)
    torch.testing.assert_close(gs, (0.5 * f_N / 12).float().expand(12, 8), rtol=1e-6, atol=0)


# ---- bad arguments ---------------------------------------------------------------------------------

def test_error_n_not_divisible_by_m():
    with pytest.raises(ValueError, match=r"N=10 must be divisible by num_groups M=4"):
        moge_route(torch.randn(2, 10), 4, 1)
    with pytest.raises(ValueError, match=r"N=10 must be divisible by num_groups M=3"):
        group_limited_route(torch.randn(2, 10), 2, 3, 1)


def test_error_k_per_group_below_one():
    with pytest.raises(ValueError, match=r"K'=0 must be in \[1, N/M=2\] \(N=8, M=4\)"):
        moge_route(torch.randn(2, 8), 4, 0)


def test_error_k_per_group_above_group_size():
    with pytest.raises(ValueError, match=r"K'=3 must be in \[1, N/M=2\] \(N=8, M=4\)"):
        moge_route(torch.randn(2, 8), 4, 3)


def test_error_topk_out_of_range():
    with pytest.raises(ValueError, match=r"k=9 must be in \[1, N=8\]"):
        topk_route(torch.randn(2, 8), 9)
    with pytest.raises(ValueError, match=r"topk_groups=5 must be in \[1, M=4\]"):
        group_limited_route(torch.randn(2, 8), 2, 4, 5)
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, topk_groups\*G=4\]"):
        group_limited_route(torch.randn(2, 8), 5, 4, 2)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 8)])
def test_error_logits_not_2d(shape):
    with pytest.raises(ValueError, match=re.escape(f"must be 2-D [T, N] with N >= 1, got shape {shape}")):
        moge_route(torch.randn(*shape), 4, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_error_non_finite_logits(bad):
    logits = torch.randn(3, 8)
    logits[1, 2] = bad
    logits[2, 5] = bad
    with pytest.raises(ValueError, match=r"contain 2 non-finite values \(NaN or inf\) out of 24"):
        moge_route(logits, 4, 1)
    with pytest.raises(ValueError, match="non-finite"):
        topk_route(logits, 2)


def test_error_router_scale_wrong_size():
    with pytest.raises(ValueError, match=r"router_scale has 6 entries .* expected N=8"):
        moge_route(torch.randn(2, 8), 4, 1, torch.ones(1, 6))


def test_expert_counts_by_hand():
    from moge.routing import expert_counts
    ids = torch.tensor([[0, 3], [3, 1], [0, 3]])
    assert expert_counts(ids, 5).tolist() == [2, 1, 0, 3, 0]
    assert expert_counts(ids, 5).dtype == torch.int64
