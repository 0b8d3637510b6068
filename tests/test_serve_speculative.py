"""``moge serve --speculative``: the continuous-batching scheduler drafting with the checkpoint's MTP
predictors. Greedy output equals ``moge.generate`` on the prompt alone (through the scheduler with
staggered arrivals and chunked prefills, and through the server with the openai client), drafts are
both kept and thrown away, seeded sampling is reproducible per request and has the main model's
distribution, and a checkpoint without predictors is a named error."""

from __future__ import annotations

import asyncio
import copy

import openai
import pytest
import torch
from tokenizers import Tokenizer

from helpers import assert_three_tokens_follow, single_thread, train_tokenizer  # noqa: F401
from moge.checkpoint import load_pretrained, read_config, save_model, write_tokenizer_config
from moge.cli import main as cli_main
from moge.config import get_config
from moge.engine.drafting import RowDrafter
from moge.engine.request import SamplingParams
from moge.engine.scheduler import Scheduler
from moge.engine.step import causal_slot_mask, prefill
from moge.engine.speculative import SpeculativeDecoder, SpeculativeError
from moge.generate import generate
from moge.model import MoGEForCausalLM
from moge.model.cache import StaticKVCache
from serve_helpers import MODEL, Server, ckpt  # noqa: F401 (ckpt: a fixture, a checkpoint without MTP)

pytestmark = pytest.mark.usefixtures("single_thread")


def patterns(g, rows: int, width: int, vocab: int) -> torch.Tensor:
    """Arithmetic sequences over ids 3..vocab-1 (stride 1-3) with 5% random tokens: learnable in a few
    dozen steps, so drafts are mostly but not always right."""
    start = torch.randint(0, vocab - 3, (rows, 1), generator=g)
    stride = torch.randint(1, 4, (rows, 1), generator=g)
    x = 3 + (start + stride * torch.arange(width)) % (vocab - 3)
    noise = torch.randint(3, vocab, (rows, width), generator=g)
    return torch.where(torch.rand(rows, width, generator=g) < 0.05, noise, x)


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """A debug-sized checkpoint with two MTP predictors trained 30 steps on patterns, and a tokenizer."""
    d = tmp_path_factory.mktemp("spec") / "mtp"
    d.mkdir()
    vocab = Tokenizer.from_file(str(train_tokenizer(d / "tokenizer.json"))).get_vocab_size()
    torch.manual_seed(0)
    m = MoGEForCausalLM(get_config("debug", num_mtp_layers=2, vocab_size=vocab, max_position_embeddings=256))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = patterns(g, 16, 24, vocab)
        out = m(ids, labels=ids)
        loss = out.loss + sum(o.loss for o in out.mtp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(m.eval(), d)
    write_tokenizer_config(d, read_config(d))
    return d


@pytest.fixture(scope="module")
def model(mtp_ckpt):
    return load_pretrained(mtp_ckpt)


def alone(model, prompt, n):
    """What moge.generate gives the prompt alone (plain greedy, no drafts), up to its first EOS."""
    out = generate(model, torch.tensor([prompt]), max_new_tokens=n, eos_token_id=2)[0, len(prompt):].tolist()
    return out[:out.index(2) + 1] if 2 in out else out


def prompts(model, rows=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    widths = [3, 9, 17, 5, 30, 2, 12, 7][:rows]
    return [patterns(g, 1, w, model.config.vocab_size)[0].tolist() for w in widths]


def kept_drafts(monkeypatch) -> list[int]:
    """Record how many drafts each decoding row keeps per step (rows riding along idle carry the pad
    token, 0, which these models practically never emit)."""
    seen: list[int] = []
    real = RowDrafter.decode

    def recording(self, cache, last_b, len_b, kv_len, sampling):
        out = real(self, cache, last_b, len_b, kv_len, sampling)
        seen.extend(n for n, t in zip(out[1], last_b) if t != 0)
        return out

    monkeypatch.setattr(RowDrafter, "decode", recording)
    return seen


@pytest.mark.parametrize("draft,chunk", [(1, 512), (2, 512), (2, 4)])
def test_scheduler_greedy_equals_generate_with_staggered_arrivals(model, monkeypatch, draft, chunk):
    kept = kept_drafts(monkeypatch)
    sched = Scheduler(model, max_batch=3, max_model_len=96, prefill_chunk=chunk, eos_token_ids=[2],
                      draft_tokens=draft)
    ps, ns = prompts(model), [20, 7, 33, 1, 12, 25, 40, 9]
    reqs, pending, t = [], list(zip(ps, ns)), 0
    while pending or sched.has_work():  # one arrival every other step: rows finish and get replaced
        if pending and t % 2 == 0:
            p, n = pending.pop(0)
            reqs.append(sched.submit(p, SamplingParams(max_tokens=n), lambda ev: None))
        sched.step()
        t += 1
    for req, p, n in zip(reqs, ps, ns):
        assert req.output_ids == alone(model, p, n), req.id
    assert sched.num_running == 0 and sched.num_waiting == 0
    # the drafts mattered: often all kept (fewer steps than tokens), sometimes none
    assert sum(k == draft for k in kept) > 20 and sum(k == 0 for k in kept) > 3, kept


@pytest.mark.parametrize("draft", [1, 2])
def test_scheduler_drafts_as_the_speculative_decoder_does(model, monkeypatch, draft):
    """A request keeps, step by step, the drafts the library's SpeculativeDecoder keeps for its prompt
    alone: the predictors' caches and first drafts after prefill are the same, and so is every step."""
    kept = kept_drafts(monkeypatch)
    sched = Scheduler(model, max_batch=2, max_model_len=96, eos_token_ids=[2], draft_tokens=draft)
    dec = SpeculativeDecoder(model, 96, draft)
    for p, n in zip(prompts(model), [20, 7, 33, 1, 12, 25, 40, 9]):
        kept.clear()
        sched.run([p], SamplingParams(max_tokens=n))
        st = {}
        dec.decode(torch.tensor([p]), None, n, eos=[2], stats=st)
        assert kept == [int(n_B[0]) for n_B, _ in st["trace"]], p


@pytest.mark.parametrize("chunk", [512, 4])
def test_scheduler_cache_holds_every_kept_position(model, chunk):
    """After the requests finish, each one's row holds in the main layers and predictor 1's exactly what
    a teacher-forced pass over its final sequence gives, at every position it kept (predictor 1's slot t
    from h_t and token t+1): the rejected drafts' positions were dropped, chunked prefill included.
    Predictor 2's slot at a row's newest position comes from a draft by design, so it is not compared."""
    m = copy.deepcopy(model).double()  # float64: the comparison is of one computation done two ways
    sched = Scheduler(m, max_batch=3, max_model_len=96, prefill_chunk=chunk, draft_tokens=2)
    L, attn = m.config.num_hidden_layers, m.model.layers[0].self_attn
    rows = {}  # each request's row of the cache as it finishes (a free row is overwritten later)

    def snapshot(i):
        def on_event(ev):
            if ev.finish_reason is not None:
                row = reqs[i].row
                rows[i] = [(sched.cache.keys[j][row].clone(), sched.cache.values[j][row].clone()) for j in range(L + 1)]
        return on_event

    reqs = []
    for i, (p, n) in enumerate(zip(prompts(model, 3), [20, 33, 12])):
        reqs.append(sched.submit(p, SamplingParams(max_tokens=n), snapshot(i)))
    while sched.has_work():
        sched.step()
    for i, req in enumerate(reqs):
        seq = torch.tensor([req.prompt_ids + req.output_ids])
        length = seq.shape[1] - 1  # the last token is emitted, never stored
        ref = StaticKVCache(L + 1, 1, attn.n_kv, attn.head_dim, seq.shape[1], dtype=torch.float64)
        _, h = prefill(m, ref, seq[:, :length], kv_len=length)
        pos = torch.arange(length)[None]
        m.mtp[0](h, m.model.embed_tokens(seq[:, 1:length + 1]), m.model.rotary(pos, h.dtype),
                 causal_slot_mask(pos, length), ref, {"position_ids": pos}, with_stats=False)
        for layer, (k, v) in enumerate(rows[i]):
            torch.testing.assert_close(k[:, :length], ref.keys[layer][0, :, :length])
            torch.testing.assert_close(v[:, :length], ref.values[layer][0, :, :length])


def test_scheduler_seeded_sampling_is_reproducible_per_request(model):
    ps = prompts(model, 4)
    sp = [SamplingParams(max_tokens=25, temperature=0.8, top_k=20, top_p=0.9, seed=s) for s in range(4)]
    sched = Scheduler(model, max_batch=4, max_model_len=96, draft_tokens=2)
    together = sched.run(ps, sp)
    assert sched.run(ps, sp) == together
    each = [Scheduler(model, max_batch=2, max_model_len=96, draft_tokens=2).run([p], q)[0] for p, q in zip(ps, sp)]
    assert each == together  # a row's draws come from its own generator, whatever else runs
    other_seed = Scheduler(model, max_batch=2, max_model_len=96, draft_tokens=2).run(
        [ps[0]], SamplingParams(max_tokens=25, temperature=0.8, top_k=20, top_p=0.9, seed=99))[0]
    assert other_seed != together[0]


def test_scheduler_speculative_sampling_has_the_main_models_distribution():
    """The first three tokens of 3000 seeded requests against the exact product of the main model's
    conditionals (a vocabulary of 8, predictors far from the main model); chi-square over cells with
    expected count >= 5 (the rest pooled), refused above the 1 - 1e-4 quantile. Seeds are fixed."""
    v, rows = 8, 3000
    torch.manual_seed(3)
    m = MoGEForCausalLM(get_config("debug", num_mtp_layers=2, vocab_size=v, initializer_range=0.3)).double().eval()
    prompt = [1, 3, 5, 2]
    sp = [SamplingParams(max_tokens=3, temperature=0.8, top_k=5, seed=i) for i in range(rows)]
    got = torch.tensor(Scheduler(m, max_batch=64, max_model_len=16, max_queue=rows, draft_tokens=2).run(
        [prompt] * rows, sp))
    assert_three_tokens_follow(m, torch.tensor([prompt]), got, 0.8, 5)


def test_server_greedy_equals_generate(mtp_ckpt, model, monkeypatch):
    kept = kept_drafts(monkeypatch)
    server = Server(mtp_ckpt, "--max-batch", "3", "--max-model-len", "96", "--speculative")
    try:
        ps, ns = prompts(model), [20, 7, 33, 1, 12, 25, 40, 9]
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        tok = Tokenizer.from_file(str(mtp_ckpt / "tokenizer.json"))
        r = c.completions.create(model=MODEL, prompt=ps[0], max_tokens=ns[0], temperature=0, logprobs=0)
        want = alone(model, ps[0], ns[0])
        assert r.choices[0].logprobs.tokens == [tok.decode([i], skip_special_tokens=False) for i in want]
        # each token's log-probability is from the verify position that emitted it: the model's own forward
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ps[0] + want])).logits[0].double(), -1)
        ref = [float(lp[len(ps[0]) - 1 + j, t]) for j, t in enumerate(want)]
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(ref, abs=1e-4)

        async def main():  # all at once over 3 rows: queued, admitted as rows free up; some streamed
            ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

            async def one(i):
                if i % 2:
                    stream = await ac.completions.create(model=MODEL, prompt=ps[i], max_tokens=ns[i], temperature=0,
                                                         stream=True)
                    return "".join([ch.choices[0].text async for ch in stream if ch.choices])
                r = await ac.completions.create(model=MODEL, prompt=ps[i], max_tokens=ns[i], temperature=0)
                return r.choices[0].text
            return await asyncio.gather(*(one(i) for i in range(len(ps))))

        for text, p, n in zip(asyncio.run(main()), ps, ns):
            assert text == tok.decode(alone(model, p, n), skip_special_tokens=True), p
        assert server.engine.scheduler.num_running == 0
    finally:
        server.close()
    assert sum(k > 0 for k in kept) > 10 and sum(k == 0 for k in kept) > 3


def test_a_checkpoint_without_predictors_is_a_named_error(ckpt, mtp_ckpt, model, capsys, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    assert cli_main(["serve", ckpt.name, "--speculative"]) == 2
    err = capsys.readouterr().err
    assert "--speculative" in err and "no MTP predictors" in err and "Traceback" not in err
    assert cli_main(["serve", ckpt.name, "--draft-tokens", "1"]) == 2
    assert "--draft-tokens needs --speculative" in capsys.readouterr().err
    monkeypatch.chdir(mtp_ckpt.parent)
    assert cli_main(["serve", mtp_ckpt.name, "--speculative", "--draft-tokens", "3"]) == 2
    assert "draft_tokens" in capsys.readouterr().err
    with pytest.raises(SpeculativeError, match="no MTP predictors"):
        Scheduler(load_pretrained(ckpt), speculative=True)
