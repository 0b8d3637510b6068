"""moge.linear: the few-rows CPU path (inference mode) equals F.linear at every row count and with
either kernel; outside inference mode it is F.linear exactly; the measured choice is made once per key."""

import pytest
import torch
import torch.nn.functional as F

from moge.linear import FEW_ROWS, Linear, linear


@pytest.fixture
def kernel():
    """Force one few-rows kernel for a test, then go back to choosing by measurement."""
    import moge.linear as ml
    yield ml.set_few_rows_kernel
    ml.set_few_rows_kernel(None)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["auto", "linear", "wxt"])
def test_linear_equals_f_linear(rows, bias, name, kernel):
    kernel(name)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True) if bias else None
    x = torch.randn(rows, 1, 40, generator=g, requires_grad=True)  # leading dims are flattened
    with torch.inference_mode():
        fast = linear(x.detach(), w.detach(), None if b is None else b.detach())
        torch.testing.assert_close(fast, F.linear(x.detach(), w.detach(), None if b is None else b.detach()),
                                   rtol=1e-5, atol=1e-5)
    got = linear(x, w, b)  # outside inference mode: F.linear itself
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (rows, 1, 24)
    assert torch.equal(got, want)


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    m = Linear(8, 4)
    assert isinstance(m, torch.nn.Linear) and list(m.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
    # other dtypes and empty inputs take F.linear unchanged
    assert torch.equal(linear(x.double(), m.weight.double()), F.linear(x.double(), m.weight.double()))
    assert linear(torch.zeros(0, 8), m.weight).shape == (0, 4)


def test_fast_path_is_taken_only_when_decoding(monkeypatch, kernel):
    import moge.linear as ml
    kernel("wxt")

    def no_f_linear(*a, **k):
        raise AssertionError("F.linear called")
    w, x = torch.randn(6, 8), torch.randn(3, 8)
    with torch.inference_mode():
        want = F.linear(x, w)
        monkeypatch.setattr(ml.F, "linear", no_f_linear)
        torch.testing.assert_close(ml.linear(x, w), want)  # the (W @ x^T)^T path
        with pytest.raises(AssertionError, match="F.linear"):
            ml.linear(torch.randn(FEW_ROWS + 1, 8), w)  # many rows
        with pytest.raises(AssertionError, match="F.linear"):
            ml.linear(x.double(), w.double())  # not float32
    with pytest.raises(AssertionError, match="F.linear"):
        ml.linear(x, w)  # not decoding


def test_measured_choice_is_made_on_the_first_real_calls_and_kept(monkeypatch, kernel):
    import moge.linear as ml
    kernel(None)
    calls = []
    for name, fn in list(ml._KERNEL_FNS.items()):
        monkeypatch.setitem(ml._KERNEL_FNS, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    w, x = torch.randn(6, 8), torch.randn(3, 8)
    with torch.inference_mode():
        for i in range(2 * ml.TUNE_REPEATS):  # every trial call returns the real product
            assert ml.few_rows_kernel(3, w) is None
            torch.testing.assert_close(ml.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-6)
        assert sorted(calls) == sorted(ml.KERNELS * ml.TUNE_REPEATS)  # alternating, 3 each
        assert calls[:2] in (list(ml.KERNELS), list(reversed(ml.KERNELS)))
        chosen = ml.few_rows_kernel(3, w)
        assert chosen in ml.KERNELS
        first = ml.linear(x, w)
        assert torch.equal(ml.linear(x, w), first) and calls[-2:] == [chosen, chosen]  # kept: same bits
        assert ml.few_rows_kernel(2, w) is None  # another row count is another key
    with pytest.raises(ValueError, match="few-rows kernel must be one of"):
        ml.set_few_rows_kernel("fast")


def test_timed_trial_keeps_the_fastest_candidate():
    import time

    import moge.linear as ml
    trials, order = {}, []
    cands = {"slow": lambda: order.append("slow") or time.sleep(0.003) or 1,
             "fast": lambda: order.append("fast") or 2}
    results = [ml.timed_trial(trials, cands, repeats=2) for _ in range(4)]
    assert [r[0] for r in results] == [1 if o == "slow" else 2 for o in order]  # each call's own result
    assert [r[1] for r in results] == [None, None, None, "fast"]  # decided once both ran twice
    assert sorted(order) == ["fast", "fast", "slow", "slow"] and order[0] != order[1]
