"""moge.engine: the static cache, prefill and the fixed-shape decode step against the plain path,
speculative-decoding hooks (S > 1, per-row rollback), sampling, the no-host-sync property, CUDA graphs."""

import pytest
import torch

from helpers import TINY_CONFIG, greedy_uncached, single_thread, write_published_checkpoint  # noqa: F401
from moge.checkpoint import load_pretrained
from moge.config import MoGEConfig
from moge.engine import CacheError, DynamicKVCache, StaticKVCache, sample_next
from moge.engine.decode import DecodeEngine
from moge.engine.step import DecodeStep, causal_slot_mask, prefill
from moge.generate import GenerationError, generate
from moge.model import MoGEForCausalLM

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = [[1, 5, 9, 33, 70, 12], [1, 44, 3], [1, 90], [1, 7, 7, 60, 2, 11], [1]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_pretrained(write_published_checkpoint(tmp_path_factory.mktemp("tiny")))


def tiny(router="moge", dtype=torch.float64, backend="auto", seed=0):
    cfg = MoGEConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24, router=router, experts_backend=backend,
                     initializer_range=0.2)
    torch.manual_seed(seed)
    return MoGEForCausalLM(cfg).to(dtype).eval()


def left_pad(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---- the caches -----------------------------------------------------------------------------------

def test_static_cache_writes_each_row_at_its_positions_and_rolls_back():
    c = StaticKVCache(num_layers=1, batch_size=2, num_kv_heads=1, head_dim=2, capacity=4)
    k = torch.arange(1, 7, dtype=torch.float32).view(2, 1, 3, 1).expand(2, 1, 3, 2)
    pos = torch.tensor([[-1, 0, 1], [0, 1, 2]])  # row 0: one padding token, then two real ones
    keys, _ = c.update(k, k, 0, {"position_ids": pos})
    assert keys.shape == (2, 1, 5, 2)  # capacity + the scratch slot
    assert keys[0, 0, :2, 0].tolist() == [2, 3] and keys[1, 0, :3, 0].tolist() == [4, 5, 6]
    assert keys[0, 0, 4, 0] == 1  # the padding token went to the scratch slot
    c.advance(torch.tensor([2, 3]))
    c.rollback(torch.tensor([1, 2]))  # per row, on the device
    assert c.lengths_B.tolist() == [1, 1]
    with pytest.raises(CacheError, match="position_ids"):
        c.update(k, k, 0)
    with pytest.raises(CacheError, match="positive"):
        StaticKVCache(1, 0, 1, 2, 4)


def test_dynamic_cache_rolls_back_whole_positions_only():
    c = DynamicKVCache()
    c.update(torch.zeros(2, 1, 5, 2), torch.zeros(2, 1, 5, 2), 0)
    c.rollback(2)
    assert c.get_seq_length() == 3
    with pytest.raises(CacheError, match="per-row"):
        c.rollback(torch.tensor([1, 2]))


def test_causal_slot_mask_is_slot_le_position():
    m = causal_slot_mask(torch.tensor([[-1, 0, 2]]), 4)
    assert m.shape == (1, 1, 3, 4)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def test_model_refuses_a_static_cache_without_engine_inputs():
    m = tiny()
    cache = StaticKVCache.for_model(m, 1, 8)
    with pytest.raises(CacheError, match="4-D"):
        m(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)


# ---- prefill + step against the plain forward ------------------------------------------------------

def test_prefill_and_steps_give_the_plain_forwards_logits():
    """float64 (RMSNorm and the router run in float32): left-padded prompts through the static cache, then single-token steps, give the logits
    of the uncached full forward of each row alone (the independent path: no cache, no padding)."""
    m = tiny()
    ids, mask = left_pad(ROWS[:4])
    cache = StaticKVCache.for_model(m, 4, 12)
    logits, _ = prefill(m, cache, ids, mask, kv_len=ids.shape[1])
    step = DecodeStep(m, cache)
    seqs = [list(r) for r in ROWS[:4]]
    for t in range(4):
        for i, r in enumerate(seqs):
            want = m(torch.tensor([r])).logits[0, -1]
            torch.testing.assert_close(logits[i, -1], want, rtol=1e-5, atol=1e-5)
        nxt = logits[:, -1].argmax(-1)
        for i, r in enumerate(seqs):
            r.append(int(nxt[i]))
        logits, _ = step(nxt.view(4, 1), kv_len=ids.shape[1] + t + 1)
    assert cache.lengths_B.tolist() == [len(r) for r in seqs]


def test_multi_token_step_and_rollback_support_draft_verification():
    """Scoring 3 tokens per row in one step equals feeding them one at a time; rolling each row back by
    its own count and re-feeding reproduces the same logits (what speculative decoding needs)."""
    m = tiny()
    ids, mask = left_pad(ROWS[:2])
    drafts = torch.tensor([[3, 8, 21], [40, 2, 17]])
    one = StaticKVCache.for_model(m, 2, 16)
    prefill(m, one, ids, mask)
    step1 = DecodeStep(m, one)
    singles = torch.stack([step1(drafts[:, j:j + 1])[0][:, 0] for j in range(3)], 1)
    many = StaticKVCache.for_model(m, 2, 16)
    prefill(m, many, ids, mask)
    step3 = DecodeStep(m, many, num_new=3)
    logits3, hidden3 = step3(drafts)
    assert logits3.shape == (2, 3, 97) and hidden3.shape == (2, 3, 32)
    torch.testing.assert_close(logits3, singles, rtol=1e-5, atol=1e-5)
    before = many.lengths_B.clone()
    many.rollback(torch.tensor([3, 1]))  # row 0 rejects all 3 drafts, row 1 the last one
    assert (before - many.lengths_B).tolist() == [3, 1]
    # the next step after the rollback sees exactly the accepted prefix
    nxt = torch.tensor([[5], [6]])
    got = DecodeStep(m, many)(nxt)[0]
    ref_rows = [ROWS[0] + [5], ROWS[1] + [40, 2, 6]]
    for i, r in enumerate(ref_rows):
        torch.testing.assert_close(got[i, 0], m(torch.tensor([r])).logits[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["moge", "topk"])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_static_greedy_equals_plain_path_token_for_token(model, router, batch):
    m = model if router == "moge" else tiny("topk", torch.float32)
    ids, mask = left_pad(ROWS[:batch])
    fast = generate(m, ids, mask, max_new_tokens=10)
    plain = generate(m, ids, mask, max_new_tokens=10, cache="dynamic")
    assert torch.equal(fast, plain)
    if batch == 1:
        assert torch.equal(fast, greedy_uncached(m, ids, 10))


def test_eos_trimming_matches_the_plain_loop(model):
    ids, mask = left_pad(ROWS[:3])
    free = generate(model, ids, mask, max_new_tokens=12, cache="dynamic")
    w = ids.shape[1]
    # an EOS every row emits early, so the plain loop stops before max_new_tokens
    common = set(free[0, w:w + 4].tolist()) & set(free[1, w:].tolist()) & set(free[2, w:].tolist())
    for eos in sorted(common)[:2] + [free[0, w + 1].item()]:
        plain = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, cache="dynamic")
        for every in (1, 3, 8):
            engine = DecodeEngine(model, w + 12, check_every=every)
            fast = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, engine=engine)
            assert torch.equal(fast, plain), (eos, every)


def test_engine_is_reusable_across_calls_and_batch_sizes(model):
    engine = DecodeEngine(model, 24)
    for batch in (2, 4, 2):
        ids, mask = left_pad(ROWS[:batch])
        assert torch.equal(generate(model, ids, mask, max_new_tokens=6, engine=engine),
                           generate(model, ids, mask, max_new_tokens=6, cache="dynamic"))
    with pytest.raises(CacheError, match="capacity"):
        generate(model, *left_pad(ROWS[:2]), max_new_tokens=40, engine=engine)
    with pytest.raises(GenerationError, match="another model"):
        generate(tiny(), *left_pad(ROWS[:2]), max_new_tokens=4, engine=engine)
    with pytest.raises(GenerationError, match="static"):
        generate(model, *left_pad(ROWS[:2]), cache="paged")


def test_transformers_wrapper_uses_the_engine_too(tmp_path):
    from transformers import AutoModelForCausalLM

    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    hf = AutoModelForCausalLM.from_pretrained(write_published_checkpoint(tmp_path / "c"))
    ids, mask = left_pad(ROWS[:3])
    assert torch.equal(generate(hf, ids, mask, max_new_tokens=6), generate(hf, ids, mask, max_new_tokens=6,
                                                                               cache="dynamic"))


# ---- sampling -------------------------------------------------------------------------------------

def test_sampling_is_reproducible_and_equal_on_both_paths(model):
    ids, mask = left_pad(ROWS[:3])

    def run(cache, seed):
        return generate(model, ids, mask, max_new_tokens=8, temperature=1.3, top_k=40, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed), cache=cache)

    a = run("static", 5)
    assert torch.equal(a, run("static", 5))
    assert torch.equal(a, run("dynamic", 5))  # same sampler, same draws
    assert not torch.equal(a, run("static", 6))


def test_exponential_race_samples_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log().expand(20000, 4), temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert torch.allclose(freq, probs.double(), atol=0.015), freq
    assert set(sample_next(probs.log().expand(500, 4), 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}


# ---- no host sync -----------------------------------------------------------------------------------

class HostSync(AssertionError):
    pass


def _run_forbidding_host_reads(fn):
    def forbid(name):
        def raiser(*args, **kwargs):
            raise HostSync(f"{name} called in the decode step")
        return raiser

    patches = [(torch.Tensor, n) for n in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__",
                                           "__float__", "__index__")] + [(torch, "nonzero")]
    saved = [(obj, n, getattr(obj, n)) for obj, n in patches]
    try:
        for obj, n in patches:
            setattr(obj, n, forbid(f"{getattr(obj, '__name__', obj)}.{n}"))
        return fn()
    finally:
        for obj, n, f in saved:
            setattr(obj, n, f)


@pytest.mark.parametrize("router", ["moge", "topk"])
def test_decode_step_makes_no_host_sync(router):
    """With the sync-free experts backend (grouped_mm, CUDA's auto) the step never reads a tensor on the
    host: the property CUDA-graph capture needs. Positive control: the CPU per-expert loop does."""
    m = tiny(router, torch.float32, backend="grouped_mm")
    ids, mask = left_pad(ROWS[:3])
    cache = StaticKVCache.for_model(m, 3, 16)
    prefill(m, cache, ids, mask)
    step = DecodeStep(m, cache, num_new=2)
    logits, _ = _run_forbidding_host_reads(lambda: step(torch.tensor([[3, 4], [5, 6], [7, 8]])))
    assert torch.isfinite(logits).all()
    for e in m.modules():
        if hasattr(e, "backend"):
            e.backend = "gemv"
    with pytest.raises(HostSync, match="tolist"):
        _run_forbidding_host_reads(lambda: step(torch.tensor([[3, 4], [5, 6], [7, 8]])))


# ---- CUDA graphs ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("router", ["moge", "topk"])
def test_cuda_graph_step_equals_eager_step_and_plain_generate(router):
    from moge.engine.graphs import GraphedStep, batch_bucket

    m = tiny(router, torch.float32).cuda()
    ids, mask = (t.cuda() for t in left_pad(ROWS[:3]))
    caches = [StaticKVCache.for_model(m, 4, 24) for _ in range(2)]
    steps = [DecodeStep(m, c) for c in caches]
    graphed = GraphedStep(steps[1])
    pad_ids = torch.cat([ids, ids[:1]])
    pad_mask = torch.cat([mask, mask[:1]])
    for c in caches:
        prefill(m, c, pad_ids, pad_mask)
    nxt = torch.tensor([[3], [5], [7], [9]], device="cuda")
    for _ in range(5):
        want, _ = steps[0](nxt)
        got, _ = graphed(nxt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nxt = want[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(caches[0].lengths_B, caches[1].lengths_B)
    assert batch_bucket(3) == 4 and batch_bucket(33) == 48
    fast = generate(m, ids, mask, max_new_tokens=8, cuda_graphs=True)
    assert torch.equal(fast, generate(m, ids, mask, max_new_tokens=8, cache="dynamic"))
