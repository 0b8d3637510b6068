"""moge.experts.linear and moge.experts.choice: the few-rows CPU path (inference mode) equals F.linear at
every row count and with either kernel; outside inference mode, and without a model's KernelChoices, it
is F.linear exactly; the measured choice is made once per key, belongs to one model, and can be pinned
and saved."""

import json

import pytest
import torch
import torch.nn.functional as F

import moge.experts.linear as ml
from moge.config import get_config
from moge.errors import InvalidArgumentError
from moge.experts import KernelChoices, use_kernels
from moge.experts.choice import TUNE_REPEATS, timed_trial
from moge.experts.linear import FEW_ROWS, KERNELS, Linear, linear


def pinned(name: str) -> KernelChoices:
    return KernelChoices(few_rows=name)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["auto", "linear", "wxt"])
def test_linear_equals_f_linear(rows, bias, name):
    kernels = pinned(name)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True) if bias else None
    x = torch.randn(rows, 1, 40, generator=g, requires_grad=True)  # leading dims are flattened
    with torch.inference_mode():
        fast = linear(x.detach(), w.detach(), None if b is None else b.detach(), kernels)
        torch.testing.assert_close(fast, F.linear(x.detach(), w.detach(), None if b is None else b.detach()),
                                   rtol=1e-5, atol=1e-5)
    got = linear(x, w, b, kernels)  # outside inference mode: F.linear itself
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (rows, 1, 24)
    assert torch.equal(got, want)


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    m = Linear(8, 4)
    assert isinstance(m, torch.nn.Linear) and list(m.state_dict()) == ["weight", "bias"]
    assert m.kernels is None  # a bare module measures nothing
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
    # other dtypes and empty inputs take F.linear unchanged
    kernels = KernelChoices()
    assert torch.equal(linear(x.double(), m.weight.double(), None, kernels), F.linear(x.double(), m.weight.double()))
    assert linear(torch.zeros(0, 8), m.weight, None, kernels).shape == (0, 4)


def test_fast_path_is_taken_only_when_decoding_with_kernel_choices(monkeypatch):
    def no_f_linear(*a, **k):
        raise AssertionError("F.linear called")
    w, x = torch.randn(6, 8), torch.randn(3, 8)
    kernels = pinned("wxt")
    with torch.inference_mode():
        want = F.linear(x, w)
        monkeypatch.setattr(ml.F, "linear", no_f_linear)
        torch.testing.assert_close(ml.linear(x, w, None, kernels), want)  # the (W @ x^T)^T path
        with pytest.raises(AssertionError, match="F.linear"):
            ml.linear(torch.randn(FEW_ROWS + 1, 8), w, None, kernels)  # many rows
        with pytest.raises(AssertionError, match="F.linear"):
            ml.linear(x.double(), w.double(), None, kernels)  # not float32
        with pytest.raises(AssertionError, match="F.linear"):
            ml.linear(x, w)  # no KernelChoices: nothing to measure with
    with pytest.raises(AssertionError, match="F.linear"):
        ml.linear(x, w, None, kernels)  # not decoding


def test_measured_choice_is_made_on_the_first_real_calls_and_kept(monkeypatch):
    calls = []
    for name, fn in list(KERNELS.items()):
        monkeypatch.setitem(KERNELS, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    kernels = KernelChoices()
    w, x = torch.randn(6, 8), torch.randn(3, 8)
    key = ml.few_rows_key(3, w, None)
    with torch.inference_mode():
        for _ in range(2 * TUNE_REPEATS):  # every trial call returns the real product
            assert kernels.get("few_rows", key) is None
            torch.testing.assert_close(ml.linear(x, w, None, kernels), F.linear(x, w), rtol=1e-5, atol=1e-6)
        assert sorted(calls) == sorted(list(KERNELS) * TUNE_REPEATS)  # alternating, 3 each
        assert calls[:2] in (list(KERNELS), list(reversed(KERNELS)))
        chosen = kernels.get("few_rows", key)
        assert chosen in KERNELS
        first = ml.linear(x, w, None, kernels)
        assert torch.equal(ml.linear(x, w, None, kernels), first) and calls[-2:] == [chosen, chosen]
        assert kernels.get("few_rows", ml.few_rows_key(2, w, None)) is None  # another row count: another key
        assert KernelChoices().get("few_rows", key) is None  # another owner has measured nothing
    with pytest.raises(InvalidArgumentError, match="few_rows kernel must be one of"):
        kernels.pin("few_rows", "fast")
    with pytest.raises(InvalidArgumentError, match="kernel kind must be one of"):
        kernels.pin("attention", "linear")


def test_choices_belong_to_a_model_and_save_and_load():
    from moge.model import MoGEForCausalLM

    a, b = MoGEForCausalLM(get_config("debug")).eval(), MoGEForCausalLM(get_config("debug")).eval()
    assert a.kernels is not b.kernels
    owners = {id(m.kernels) for m in a.modules() if getattr(type(m), "takes_kernels", False)}
    assert owners == {id(a.kernels)}  # every Linear and experts module of the model, head and MTP included
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        for _ in range(2 * TUNE_REPEATS + 1):
            a(ids[:, :1])
    saved = json.loads(json.dumps(a.kernels.state_dict()))
    assert saved["chosen"]["few_rows"] and saved["chosen"]["decode_experts"]
    assert b.kernels.state_dict()["chosen"] == {"few_rows": {}, "decode_experts": {}}  # b measured nothing
    b.kernels.load_state_dict(saved)
    assert b.kernels.state_dict() == saved
    b.kernels.pin("few_rows", "wxt")
    assert b.kernels.state_dict()["chosen"]["few_rows"] == {} and b.kernels.pinned["few_rows"] == "wxt"
    use_kernels(b, None)
    assert all(m.kernels is None for m in b.modules() if getattr(type(m), "takes_kernels", False))
    with pytest.raises(InvalidArgumentError, match="unknown kind or candidate"):
        KernelChoices().load_state_dict({"chosen": {"few_rows": {"k": "fast"}}})


def test_timed_trial_keeps_the_fastest_candidate():
    import time

    trials, order = {}, []
    cands = {"slow": lambda: order.append("slow") or time.sleep(0.003) or 1,
             "fast": lambda: order.append("fast") or 2}
    results = [timed_trial(trials, cands, repeats=2) for _ in range(4)]
    assert [r[0] for r in results] == [1 if o == "slow" else 2 for o in order]  # each call's own result
    assert [r[1] for r in results] == [None, None, None, "fast"]  # decided once both ran twice
    assert sorted(order) == ["fast", "fast", "slow", "slow"] and order[0] != order[1]
