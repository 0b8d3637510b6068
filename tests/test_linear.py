"""moge.linear: the few-rows CPU path (inference mode) equals F.linear at every row count; outside
inference mode it is F.linear exactly."""

import pytest
import torch
import torch.nn.functional as F

from moge.linear import FEW_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 8, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(rows, bias):
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


def test_fast_path_is_taken_only_when_decoding(monkeypatch):
    import moge.linear as ml

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
