"""moge.linear: the few-rows CPU path equals F.linear (values and gradients) at every row count."""

import pytest
import torch
import torch.nn.functional as F

from moge.linear import FEW_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 8, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_with_gradients(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True) if bias else None
    x = torch.randn(rows, 1, 40, generator=g, requires_grad=True)  # leading dims are flattened
    got = linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (rows, 1, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gy = torch.randn(want.shape, generator=g)
    grads = [torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy) for y in (got, want)]
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    m = Linear(8, 4)
    assert isinstance(m, torch.nn.Linear) and list(m.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
    # other dtypes and empty inputs take F.linear unchanged
    assert torch.equal(linear(x.double(), m.weight.double()), F.linear(x.double(), m.weight.double()))
    assert linear(torch.zeros(0, 8), m.weight).shape == (0, 4)
