"""The compiled CPU decode step (``DecodeStep(compile=True)``, ``generate(compile=True)``, ``moge
generate --compile``): one-row products and the routed experts in reduce form, checked against the
eager step and the uncached forward.

Each compile of a tiny model takes a few seconds, so the module compiles few shapes: a MoGE model at
batch 1 (through the command line, from a relative path) and a top-K model at batch 3 with prompts of
different lengths (left padding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import greedy_uncached, single_thread, write_published_checkpoint  # noqa: F401

from moge.cli import main as cli_main
from moge.config import MoGEConfig
from moge.engine.decode import DecodeEngine
from moge.experts import eager_experts, reduce_experts, reduce_linear
from moge.generate import GenerationError, generate
from moge.model import MoGEForCausalLM
from moge.quant import WeightOnlyLinear, quantize_weights, set_weight_only
from moge.routing import moge_select, router_scores


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(router: str, seed: int = 0) -> MoGEForCausalLM:
    cfg = MoGEConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24, router=router, initializer_range=0.2)
    torch.manual_seed(seed)
    return MoGEForCausalLM(cfg).eval()


@pytest.mark.parametrize("tokens", [1, 5])
def test_reduce_experts_equal_the_eager_loop(tokens):
    """The reduce form is the same function as the per-expert loop (float64, MoGE routing, T=1 and T>1)."""
    g = torch.Generator().manual_seed(tokens)
    n, h, f, m = 8, 16, 6, 4
    x = torch.randn(tokens, h, generator=g, dtype=torch.float64)
    gate_up, down = torch.randn(n, 2 * f, h, generator=g, dtype=torch.float64), torch.randn(n, h, f, generator=g,
                                                                                            dtype=torch.float64)
    w, ids = moge_select(router_scores(torch.randn(tokens, n, generator=g, dtype=torch.float64)), m, 1)
    torch.testing.assert_close(reduce_experts(x, ids, w, gate_up, down), eager_experts(x, ids, w, gate_up, down))


def test_reduce_linear_equals_f_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    torch.testing.assert_close(reduce_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert reduce_linear(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


def test_compiled_step_gives_the_eager_steps_logits_and_tokens_for_a_padded_batch():
    """Top-K router, 3 rows of different lengths: every step's logits equal the eager step's (float32
    rounding), and the greedy tokens equal the eager engine's and the uncached forward's."""
    model = tiny("topk")
    rows = [[1, 5, 9, 33, 70, 12], [1, 44, 3], [1, 90, 17, 8]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    eager, compiled = DecodeEngine(model, 32), DecodeEngine(model, 32, compile=True)
    out_eager = eager.decode(ids, mask, 10)
    out_compiled = compiled.decode(ids, mask, 10)
    assert torch.equal(out_compiled, out_eager)
    _, step, _ = compiled._slot(3)
    assert step.compiled
    for r, row in enumerate(rows):
        assert torch.equal(out_compiled[r, width:], greedy_uncached(model, torch.tensor([row]), 10)[0, len(row):])
    # the logits of one more step, from the same cache state
    (c_cache, c_step, _), (_, e_step, _) = compiled._slot(3), eager._slot(3)
    nxt = out_eager[:, -1:]
    lengths = c_cache.lengths_B.clone()
    logits_c, _ = c_step(nxt)
    logits_e, _ = e_step(nxt)
    assert torch.equal(c_cache.lengths_B, lengths + 1)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-5)


def test_compiled_steps_of_two_models_each_replay_their_own():
    """A compiled step keeps no guards (it replays its trace), so two steps of equal shapes must not share
    a graph: a MoGE model and a top-K model with other weights, called in turn, each give their own eager
    step's logits, and ids passed as a strided column are read correctly."""
    from moge.engine.step import DecodeStep
    from moge.model.cache import StaticKVCache
    models = [tiny("moge", seed=1), tiny("topk", seed=2)]
    steps = [(DecodeStep(m, StaticKVCache.for_model(m, 1, 8), compile=True),
              DecodeStep(m, StaticKVCache.for_model(m, 1, 8))) for m in models]
    wide = torch.tensor([[5, 60, 7, 11, 3, 90, 41, 2]])
    for t in range(4):
        ids = wide[:, 2 * t:2 * t + 1]  # a column of a wider tensor: stride 8, not 1
        for compiled, eager in steps:
            torch.testing.assert_close(compiled(ids)[0], eager(ids)[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(steps[0][0](wide[:, :1])[0], steps[1][0](wide[:, :1])[0])


def test_generate_compile_command_from_a_relative_path(tmp_path, monkeypatch, capsys):
    """``moge generate --compile`` on a MoGE checkpoint named relatively prints the eager command's tokens."""
    write_published_checkpoint(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    args = ["generate", "ckpt", "--prompt-ids", "1 5 9 33", "--max-new-tokens", "6"]
    assert cli_main(args) == 0
    eager_out = capsys.readouterr().out
    assert cli_main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager_out and eager_out.strip()


def test_compile_refuses_what_it_does_not_compile():
    model, ids = tiny("moge"), torch.tensor([[1, 2, 3]])
    with pytest.raises(GenerationError, match="cache='static'"):
        generate(model, ids, max_new_tokens=2, cache="dynamic", compile=True)
    with pytest.raises(GenerationError, match="True or False"):
        generate(model, ids, max_new_tokens=2, compile="yes")
    with pytest.raises(GenerationError, match="built without it"):
        generate(model, ids, max_new_tokens=2, compile=True, engine=DecodeEngine(model, 8))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_weight_only_reduce_rows_equal_the_dequantized_weights(bits, group):
    """A weight-only int8/int4 weight in reduce form is its dequantized weight times the rows (float
    activations, per pair its own matrix)."""
    g = torch.Generator().manual_seed(bits)
    w = WeightOnlyLinear.quantize(torch.randn(5, 48, 64, generator=g), torch.randn(5, 48, generator=g), bits, group)
    x, ids = torch.randn(7, 64, generator=g, dtype=torch.float64), torch.tensor([0, 4, 4, 1, 2, 0, 3])
    want = torch.einsum("poi,pi->po", w.dequantized_weight(torch.float64)[ids], x) + w.bias[ids].double()
    torch.testing.assert_close(w.reduce_rows(x, ids), want)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_step_runs_weight_only_models_in_reduce_form(bits):
    """A weight-only model (experts, attention, shared experts, head) compiles into one graph and gives
    the tokens of its float-activation oracle (``act_dtype=input``, the dequantized weights; the
    prefill, eager, runs that oracle in both)."""
    cfg = MoGEConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=32,
                     shared_expert_intermediate_size=64, initializer_range=0.2)
    torch.manual_seed(bits)
    model = MoGEForCausalLM(cfg).eval()
    quantize_weights(model, bits, 32 if bits == 4 else None, head=True)
    ids = torch.tensor([[1, 5, 9, 33, 70, 12]])
    set_weight_only(model, compute="dequant", act_dtype="input")
    want = DecodeEngine(model, 32).decode(ids, None, 8)
    engine = DecodeEngine(model, 32, compile=True)
    assert torch.equal(engine.decode(ids, None, 8), want)
