"""Speculative decoding with the MTP predictors (moge.engine.speculative): greedy output equal to plain
greedy token for token, EOS inside a draft, cache rollback against a plain run, the sampler's output
distribution against the main model's exact one, the acceptance rule alone, and named errors."""

import copy

import pytest
import torch

from helpers import assert_three_tokens_follow, single_thread  # noqa: F401
from moge.config import get_config
from moge.engine import StaticKVCache
from moge.engine.sampling import sampling_probs
from moge.engine.speculative import SpeculativeDecoder, SpeculativeError, accept_drafts
from moge.engine.step import causal_slot_mask, prefill
from moge.generate import GenerationError, generate
from moge.model import MoGEForCausalLM

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 64
STEPS = 20
_TRAINED: dict[int, MoGEForCausalLM] = {}


def pattern_batch(g, b, s):
    """Arithmetic sequences mod VOCAB (start and stride 1-3 random) with 5% random tokens: learnable in
    a few dozen steps, so drafts are mostly but not always right."""
    start = torch.randint(0, VOCAB, (b, 1), generator=g)
    stride = torch.randint(1, 4, (b, 1), generator=g)
    x = (start + stride * torch.arange(s)) % VOCAB
    return torch.where(torch.rand(b, s, generator=g) < 0.05, torch.randint(0, VOCAB, (b, s), generator=g), x)


def trained(num_mtp: int) -> MoGEForCausalLM:
    """A float64 debug model (vocab 64) with ``num_mtp`` predictors, trained 20 steps on pattern_batch."""
    if num_mtp not in _TRAINED:
        torch.manual_seed(0)
        m = MoGEForCausalLM(get_config("debug", num_mtp_layers=num_mtp, vocab_size=VOCAB)).double()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(STEPS):
            ids = pattern_batch(g, 16, 24)
            out = m(ids, labels=ids)
            loss = out.loss + sum(o.loss for o in out.mtp)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED[num_mtp] = m.eval()
    return _TRAINED[num_mtp]


def prompts(seed, rows=5, width=7):
    """Left-padded prompts: pattern rows and random rows, lengths width, width-2, ..., at least 1."""
    g = torch.Generator().manual_seed(seed)
    ids = pattern_batch(g, rows, width)
    ids[rows // 2:] = torch.randint(0, VOCAB, (rows - rows // 2, width), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, :min(2 * r, width - 1)] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ---- greedy: token for token ----------------------------------------------------------------------

@pytest.mark.parametrize("num_mtp,draft", [(1, 1), (2, 1), (2, 2)])
def test_speculative_greedy_equals_plain_greedy(num_mtp, draft):
    m = trained(num_mtp)
    accepted = rejected = 0
    for seed in range(3):
        ids, mask = prompts(seed)
        for n_new in (1, 2, 23):  # 23: not a multiple of 1 + D
            plain = generate(m, ids, mask, n_new, cache="dynamic")
            assert torch.equal(generate(m, ids, mask, n_new), plain)
            st = {}
            dec = SpeculativeDecoder(m, ids.shape[1] + n_new, draft)
            assert torch.equal(dec.decode(ids, mask, n_new, stats=st), plain), (seed, n_new)
            accepted += st["accepted"][0]
            rejected += st["row_steps"] - st["accepted"][0]
        assert torch.equal(generate(m, ids, mask, 23, draft_tokens=draft), plain)
    # both branches ran often: drafts kept and drafts thrown away
    assert accepted > 30 and rejected > 10, (accepted, rejected)


def draft_positions(trace, rows):
    """Per row, the output offsets whose tokens were kept drafts (no EOS, so every step writes n + 1)."""
    out = [set() for _ in range(rows)]
    cnt = [1] * rows
    for n_B, _ in trace:
        for r in range(rows):
            n = int(n_B[r])
            out[r].update(range(cnt[r], cnt[r] + n))
            cnt[r] += n + 1
    return out


@pytest.mark.parametrize("num_mtp", [1, 2])
def test_eos_inside_a_draft_stops_the_row_like_plain_greedy(num_mtp):
    m = trained(num_mtp)
    ids, mask = prompts(1)
    w, n_new = ids.shape[1], 20
    st = {}
    free = SpeculativeDecoder(m, w + n_new).decode(ids, mask, n_new, stats=st)
    drafted = draft_positions(st["trace"], ids.shape[0])
    tried = 0
    for r in range(ids.shape[0]):
        row = free[r, w:].tolist()
        first = {}
        for i, t in enumerate(row):
            first.setdefault(t, i)
        for tok, i in first.items():
            if i in drafted[r] and tried < 6:  # this row's first `tok` was an accepted draft
                tried += 1
                plain = generate(m, ids, mask, n_new, eos_token_id=tok, pad_token_id=0, cache="dynamic")
                spec = generate(m, ids, mask, n_new, eos_token_id=tok, pad_token_id=0, speculative=True)
                assert torch.equal(spec, plain), (r, tok)
    assert tried >= 3
    # every row ends on EOS at once (the first token): one column
    first_tok = free[:, w].tolist()
    out = generate(m, ids, mask, n_new, eos_token_id=first_tok, pad_token_id=0, speculative=True)
    assert out.shape[1] == w + 1


# ---- the cache after speculation -----------------------------------------------------------------

@pytest.mark.parametrize("num_mtp", [1, 2])
def test_rollback_keeps_exactly_the_accepted_positions(num_mtp):
    m = trained(num_mtp)
    ids, mask = prompts(2)
    w, n_new, b = ids.shape[1], 18, ids.shape[0]
    dec = SpeculativeDecoder(m, w + n_new)
    st = {}
    out = dec.decode(ids, mask, n_new, stats=st)
    cache = dec._slots[b][0]
    L = m.config.num_hidden_layers
    plen = mask.sum(1)
    for n_B, keep_B in st["trace"]:  # a row still going keeps its drafts and the token after them
        assert ((keep_B == n_B + 1) | (keep_B == 0)).all()
    assert torch.equal(cache.lengths_B, plen + sum(k for _, k in st["trace"]))
    for r in range(b):
        length = int(cache.lengths_B[r])
        seq = torch.cat([ids[r, w - int(plen[r]):], out[r, w:]])[None]  # this row, unpadded
        attn = m.model.layers[0].self_attn
        ref = StaticKVCache(L + 1, 1, attn.n_kv, attn.head_dim, seq.shape[1], dtype=torch.float64)
        _, h = prefill(m, ref, seq[:, :length], kv_len=length)
        # predictor 1, teacher-forced over the stored positions: h_t and token t+1
        pos = torch.arange(length)[None]
        m.mtp[0](h, m.model.embed_tokens(seq[:, 1:length + 1]), m.model.rotary(pos, h.dtype),
                 causal_slot_mask(pos, length), ref, {"position_ids": pos}, with_stats=False)
        for layer in range(L + 1):
            torch.testing.assert_close(cache.keys[layer][r, :, :length], ref.keys[layer][0, :, :length])
            torch.testing.assert_close(cache.values[layer][r, :, :length], ref.values[layer][0, :, :length])


# ---- sampling: the main model's distribution -----------------------------------------------------

def test_acceptance_rule_keeps_the_target_distribution():
    rows = 200_000
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q.expand(rows, 4), 1, replacement=True, generator=g)
    n, tok = accept_drafts(p.expand(rows, 2, 4), q.expand(rows, 1, 4), drafts, g)
    # P(keep) = sum min(p, q) = 0.5; the first emitted token ~ p0; after a kept draft, the bonus ~ p1
    assert abs(n.double().mean().item() - 0.5) < 0.01
    first = torch.where(n == 1, drafts[:, 0], tok)
    torch.testing.assert_close(torch.bincount(first, minlength=4).double() / rows, p[0].double(), atol=0.01, rtol=0)
    bonus = tok[n == 1]
    torch.testing.assert_close(torch.bincount(bonus, minlength=4).double() / len(bonus), p[1].double(),
                               atol=0.01, rtol=0)
    # identical p and q: every draft kept
    n_same, _ = accept_drafts(p[None, :, :].expand(8, 2, 4), p[None, :1].expand(8, 1, 4), drafts[:8, :1] % 3, g)
    assert (n_same == 1).all()
    with pytest.raises(SpeculativeError, match="q must be"):
        accept_drafts(p[None], q[None, :, :3], drafts[:1])


@pytest.mark.parametrize("draft,temperature,top_k,top_p", [(1, 1.0, 0, 1.0), (2, 1.0, 0, 1.0), (2, 0.8, 5, 0.9)])
def test_speculative_sampling_has_the_main_models_distribution(draft, temperature, top_k, top_p):
    """Joint distribution of the first three tokens over 8000 rows (one call) against the exact product
    of the main model's conditionals; chi-square over cells with expected count >= 5 (the rest pooled),
    refused above the 1 - 1e-4 quantile. Fixed seeds, so the outcome is deterministic."""
    v, rows = 8, 8000
    torch.manual_seed(3)
    m = MoGEForCausalLM(get_config("debug", num_mtp_layers=2, vocab_size=v, initializer_range=0.3)).double().eval()
    prompt = torch.tensor([[1, 3, 5, 2]])
    st = {}
    dec = SpeculativeDecoder(m, prompt.shape[1] + 3, draft)
    out = dec.decode(prompt.expand(rows, -1), None, 3, temperature, top_k, top_p,
                       generator=torch.Generator().manual_seed(0), stats=st)
    assert 0.1 < st["accepted"][0] / st["row_steps"] < 0.9  # both accept and reject happened often
    probs = assert_three_tokens_follow(m, prompt, out[:, -3:], temperature, top_k, top_p)
    p1, p2 = probs[0, 0], probs[:, 1].reshape(v, v, v)[:, 0]  # [v], [t1, t2]
    # the test has power: predictor 1's distribution of the second token (what drafts follow) is far
    # from the main model's, so a rule that kept drafts too often would show
    pairs = torch.cat([prompt.expand(v, -1), torch.arange(v).view(v, 1)], dim=1)
    with torch.no_grad():
        h, _ = m.model(pairs)
        n = pairs.shape[1] - 1
        pos = torch.arange(n).expand(v, n)
        hq, _ = m.mtp[0](h[:, :n], m.model.embed_tokens(pairs[:, 1:]), m.model.rotary(pos, h.dtype), None)
        q2 = sampling_probs(m.mtp[0].logits(m.lm_head, hq)[:, -1], temperature, top_k, top_p).double()
    tv = 0.5 * (p1[:, None] * (q2 - p2).abs()).sum().item()
    assert tv > 0.2, tv


def test_speculative_sampling_is_reproducible_and_stops_at_eos():
    m = trained(2)
    ids, mask = prompts(3)

    def run(seed, eos=None):
        return generate(m, ids, mask, 20, temperature=0.9, top_k=20, top_p=0.95, eos_token_id=eos, pad_token_id=0,
                        generator=torch.Generator().manual_seed(seed), speculative=True)

    a = run(0)
    assert a.shape == (ids.shape[0], ids.shape[1] + 20)
    assert torch.equal(a, run(0)) and not torch.equal(a, run(1))
    eos = int(a[0, ids.shape[1] + 3])  # a token row 0 samples early
    out = run(0, eos)[:, ids.shape[1]:]
    for row in out.tolist():
        if eos in row:  # nothing but padding after a row's first EOS
            assert all(t == 0 for t in row[row.index(eos) + 1:])


# ---- the front: options, wrapper, errors ----------------------------------------------------------

def test_transformers_wrapper_decodes_speculatively(tmp_path):
    from transformers import AutoModelForCausalLM

    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    from moge.checkpoint import save_model
    save_model(copy.deepcopy(trained(1)).float(), tmp_path / "c")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    ids, mask = prompts(0)
    assert torch.equal(generate(hf, ids, mask, 12, speculative=True), generate(hf, ids, mask, 12, cache="dynamic"))


def test_bad_speculative_requests_are_named_errors():
    m = trained(2)
    ids, mask = prompts(0)
    plain = MoGEForCausalLM(get_config("debug", vocab_size=VOCAB)).double().eval()
    with pytest.raises(SpeculativeError, match="no MTP predictors"):
        generate(plain, ids, mask, 4, speculative=True)
    with pytest.raises(GenerationError, match="draft_tokens"):
        generate(m, ids, mask, 4, draft_tokens=3)
    with pytest.raises(GenerationError, match="draft_tokens"):
        generate(m, ids, mask, 4, draft_tokens=0)
    with pytest.raises(GenerationError, match="static cache"):
        generate(m, ids, mask, 4, speculative=True, cache="dynamic")
    with pytest.raises(GenerationError, match="speculative must be"):
        generate(m, ids, mask, 4, speculative="yes")
    from moge.engine.decode import DecodeEngine
    with pytest.raises(GenerationError, match="SpeculativeDecoder"):
        generate(m, ids, mask, 4, speculative=True, engine=DecodeEngine(m, 16))
    with pytest.raises(GenerationError, match="drafts 2"):
        generate(m, ids, mask, 4, draft_tokens=1, engine=SpeculativeDecoder(m, 16))
    with pytest.raises(SpeculativeError, match="capacity"):
        SpeculativeDecoder(m, 8).decode(ids, mask, 4)
    with pytest.raises(SpeculativeError, match="draft_tokens"):
        SpeculativeDecoder(m, 16, draft_tokens=5)


def test_cli_speculative_flags(tmp_path, capsys):
    from moge.checkpoint import save_model
    from moge.cli import main
    save_model(copy.deepcopy(trained(1)).float(), tmp_path / "c")
    argv = ["generate", str(tmp_path / "c"), "--prompt-ids", "1 2 3 4", "--max-new-tokens", "6"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--speculative"]) == 0
    assert capsys.readouterr().out == plain
    assert main(argv + ["--draft-tokens", "1"]) != 0
    assert "--draft-tokens needs --speculative" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speculative_greedy_on_cuda_equals_plain():
    m = copy.deepcopy(trained(2)).float().cuda()
    ids, mask = prompts(0)
    ids, mask = ids.cuda(), mask.cuda()
    assert torch.equal(generate(m, ids, mask, 16, speculative=True), generate(m, ids, mask, 16))
