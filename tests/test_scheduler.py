"""moge.engine.scheduler: continuous batching gives each request what moge.generate gives its prompt alone
(greedy token for token, seeded sampling draw for draw) whatever else runs and whenever it arrived; echo
log-probabilities are the model's own forward's; aborts, the queue bound, the context check, failure
isolation, and no row left behind."""

import pytest
import torch

from helpers import single_thread, write_published_checkpoint  # noqa: F401
from moge.checkpoint import load_pretrained
from moge.config import MoGEConfig
from moge.model.cache import RowSubsetCache, StaticKVCache
from moge.engine.sampling import sample_next, sample_rows
from moge.engine.request import AdmissionError, QueueFullError, SamplingParams
from moge.engine.scheduler import Scheduler
from moge.generate import generate
from moge.model import MoGEForCausalLM
from moge.quant import is_quantized, quantize

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [[1, 5, 9, 33, 70, 12], [1, 44, 3], [1, 90], [1, 7, 7, 60, 2, 11, 40, 41, 42, 43, 3], [1],
           [1, 8, 8, 8, 8], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72], [1, 2, 3]]
MAX_TOKENS = [7, 12, 3, 9, 15, 5, 8, 11]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_pretrained(write_published_checkpoint(tmp_path_factory.mktemp("tiny")))


def alone(model, prompt, n, **kw):
    return generate(model, torch.tensor([prompt]), max_new_tokens=n, **kw)[0, len(prompt):].tolist()


def collect():
    events = []
    return events, events.append


def staggered(sched, prompts, params, every=2):
    """Submit one request every ``every`` steps (rows finish and get replaced meanwhile); return the requests."""
    reqs, pending, t = [], list(zip(prompts, params)), 0
    while pending or sched.has_work():
        if pending and t % every == 0:
            p, sp = pending.pop(0)
            reqs.append(sched.submit(p, sp, lambda ev: None))
        sched.step()
        t += 1
        assert t < 1000
    return reqs


@pytest.mark.parametrize("chunk", [512, 4])
def test_greedy_equals_generate_alone_with_staggered_arrivals(model, chunk):
    sched = Scheduler(model, max_batch=3, max_model_len=64, prefill_chunk=chunk)
    reqs = staggered(sched, PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS])
    for req, p, n in zip(reqs, PROMPTS, MAX_TOKENS):
        assert req.output_ids == alone(model, p, n), req.id
    assert sched.num_running == 0 and sched.num_waiting == 0


def test_eos_and_stop_ids_finish_rows_early(model):
    free = alone(model, PROMPTS[0], 8)
    eos = free[2]
    sched = Scheduler(model, max_batch=2, max_model_len=64, eos_token_ids=[eos])
    events, cb = collect()
    req = sched.submit(PROMPTS[0], SamplingParams(max_tokens=8), cb)
    other = sched.submit(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True), lambda ev: None)
    while sched.has_work():
        sched.step()
    assert req.output_ids == free[:free.index(eos) + 1] and events[-1].finish_reason == "stop"
    assert other.output_ids == alone(model, PROMPTS[1], 8)  # ignore_eos: runs to max_tokens
    stop_at = alone(model, PROMPTS[1], 8)[4]
    out = sched.run([PROMPTS[1]], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert out[-1] == stop_at and len(out) <= 5


def test_seeded_sampling_is_per_request_and_equals_generate(model):
    sp = [SamplingParams(max_tokens=10, temperature=1.3, top_k=k, top_p=p, seed=s)
          for k, p, s in ((0, 1.0, 7), (20, 1.0, 8), (0, 0.9, 9), (5, 0.8, 10))]
    ref = [alone(model, PROMPTS[i], 10, temperature=q.temperature, top_k=q.top_k, top_p=q.top_p,
                 generator=torch.Generator().manual_seed(q.seed)) for i, q in enumerate(sp)]
    together = Scheduler(model, max_batch=4, max_model_len=64).run(PROMPTS[:4], sp)
    mixed = staggered(Scheduler(model, max_batch=2, max_model_len=64), PROMPTS[:4] + PROMPTS[4:6],
                      sp + [SamplingParams(max_tokens=6, temperature=2.0, seed=1)] * 2, every=3)
    assert together == ref
    assert [r.output_ids for r in mixed[:4]] == ref


def test_row_views_write_into_the_shared_buffers():
    c = StaticKVCache(num_layers=1, batch_size=3, num_kv_heads=1, head_dim=1, capacity=4)
    lead = c.rows(0, 2)
    k = torch.tensor([[5.0], [6.0]]).view(2, 1, 1, 1)
    lead.update(k, k, 0, {"position_ids": torch.tensor([[0], [1]])})
    lead.advance(1)
    assert c.keys[0][0, 0, 0, 0] == 5 and c.keys[0][1, 0, 1, 0] == 6 and c.lengths_B.tolist() == [1, 1, 0]
    sub = RowSubsetCache(c, torch.tensor([2, 0]), attend=2)
    got, _ = sub.update(torch.tensor([[7.0], [8.0]]).view(2, 1, 1, 1), k, 0, {"position_ids": torch.tensor([[0], [1]])})
    sub.advance(1)
    assert got.shape == (2, 1, 2, 1) and got[0, 0, 0, 0] == 7 and got[1, 0, :, 0].tolist() == [5, 8]
    assert c.keys[0][2, 0, 0, 0] == 7 and c.lengths_B.tolist() == [2, 1, 1]


def test_sample_rows_gives_each_row_what_sample_next_gives_it_alone():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 4, 1.0), (1.5, 0, 0.6), (2.0, 10, 0.9)]
    temp, topk, topp = (torch.tensor([s[i] for s in settings]) for i in range(3))
    out = sample_rows(logits, temp.float(), topk.long(), topp.float(),
                      [torch.Generator().manual_seed(i) for i in range(5)])
    for i, (t, k, p) in enumerate(settings):
        want = sample_next(logits[i:i + 1], t, k, p, torch.Generator().manual_seed(i))
        assert int(out[i]) == int(want[0]), i


def test_echo_logprobs_are_the_forwards_log_softmax(model):
    sched = Scheduler(model, max_batch=2, max_model_len=64, prefill_chunk=5)
    events, cb = collect()
    prompt = PROMPTS[6]
    req = sched.submit(prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2), cb)
    sched.submit(PROMPTS[0], SamplingParams(max_tokens=6), lambda ev: None)
    while sched.has_work():
        sched.step()
    full = torch.tensor([prompt + req.output_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
    plp = events[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        assert plp[i][0] == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        assert set(plp[i][1]) == set(lp[i - 1].topk(2).indices.tolist())
    for j, ev in enumerate(events):
        pos = len(prompt) - 1 + j
        assert ev.logprob == pytest.approx(float(lp[pos, ev.token]), abs=1e-4)
        assert max(ev.top_logprobs.values()) == pytest.approx(float(lp[pos].max()), abs=1e-4)


def test_abort_frees_the_row_within_a_step_and_leaves_the_queue(model):
    sched = Scheduler(model, max_batch=1, max_model_len=64)
    ev_run, cb_run = collect()
    ev_wait, cb_wait = collect()
    running = sched.submit(PROMPTS[0], SamplingParams(max_tokens=40), cb_run)
    waiting = sched.submit(PROMPTS[1], SamplingParams(max_tokens=40), cb_wait, request_id="w")
    sched.step()
    sched.step()
    assert sched.num_running == 1 and sched.num_waiting == 1
    sched.abort(running.id)
    sched.abort("w")
    sched.step()
    assert ev_run[-1].finish_reason == "abort" and ev_wait[-1].finish_reason == "abort"
    assert sched.num_running == 0 and sched.num_waiting == 0 and not sched.has_work()
    # step 1: the prefill samples token 1 and the same step decodes token 2; step 2: token 3; then aborted
    assert len(running.output_ids) == 3 and waiting.output_ids == []


def test_queue_bound_and_context_check(model):
    sched = Scheduler(model, max_batch=1, max_model_len=16, max_queue=2)
    with pytest.raises(AdmissionError, match="context is 16 tokens"):
        sched.submit([1] * 10, SamplingParams(max_tokens=7), lambda ev: None)
    with pytest.raises(AdmissionError, match="empty"):
        sched.submit([], SamplingParams(), lambda ev: None)
    with pytest.raises(AdmissionError, match="outside the vocabulary"):
        sched.submit([1, 500], SamplingParams(), lambda ev: None)
    for _ in range(2):
        sched.submit([1, 2], SamplingParams(max_tokens=2), lambda ev: None)
    with pytest.raises(QueueFullError):
        sched.submit([1, 2], SamplingParams(max_tokens=2), lambda ev: None)
    with pytest.raises(AdmissionError, match="max_model_len"):
        Scheduler(model, max_model_len=10_000)


def test_a_failing_request_fails_alone(model, monkeypatch):
    sched = Scheduler(model, max_batch=3, max_model_len=64)
    real = Scheduler._prefill_chunks

    def flaky(self, chunks):
        if any(req.prompt_ids[-1] == 77 for req, _ in chunks):
            raise RuntimeError("injected")
        return real(self, chunks)

    monkeypatch.setattr(Scheduler, "_prefill_chunks", flaky)
    bad_events, bad_cb = collect()

    def broken_listener(ev):
        raise OSError("client went away")

    bad = sched.submit([1, 77], SamplingParams(max_tokens=5), bad_cb)
    deaf = sched.submit(PROMPTS[2], SamplingParams(max_tokens=5), broken_listener)
    good = [sched.submit(p, SamplingParams(max_tokens=6), lambda ev: None) for p in PROMPTS[:3]]
    while sched.has_work():
        sched.step()
    assert bad_events[-1].finish_reason == "error" and "injected" in bad_events[-1].error
    assert deaf.finished and len(deaf.output_ids) == 1
    for r, p in zip(good, PROMPTS):
        assert r.output_ids == alone(model, p, 6)
    assert sched.num_running == 0


def test_many_requests_leave_nothing_behind(model):
    sched = Scheduler(model, max_batch=4, max_model_len=32, max_queue=300)
    outs = sched.run([PROMPTS[i % 8][:3] for i in range(200)], SamplingParams(max_tokens=2))
    assert len(outs) == 200 and all(len(o) == 2 for o in outs)
    assert sched.num_running == 0 and sched.num_waiting == 0 and sched._rows == [None] * 4
    assert sched._len == [0] * 4


@pytest.mark.parametrize("router,w8a8", [("moge", False), ("topk", False), ("moge", True)])
def test_routers_and_w8a8(router, w8a8):
    cfg = MoGEConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24, router=router, initializer_range=0.2)
    torch.manual_seed(0)
    m = MoGEForCausalLM(cfg).eval()
    if w8a8:  # the int8 model a W8A8 checkpoint loads as
        quantize(m, torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(0)), progress=False)
        assert is_quantized(m)
    sched = Scheduler(m, max_batch=2, max_model_len=48)
    reqs = staggered(sched, PROMPTS[:5], [SamplingParams(max_tokens=n) for n in MAX_TOKENS[:5]])
    for r, p, n in zip(reqs, PROMPTS, MAX_TOKENS):
        assert r.output_ids == alone(m, p, n)


@pytest.mark.cuda
def test_cuda_graph_decoding_equals_generate_alone():
    cfg = MoGEConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24, initializer_range=0.2)
    torch.manual_seed(0)
    m = MoGEForCausalLM(cfg).cuda().eval()
    sched = Scheduler(m, max_batch=4, max_model_len=64)
    assert sorted(sched._graphs) == [1, 2, 4]
    reqs = staggered(sched, PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS])
    for r, p, n in zip(reqs, PROMPTS, MAX_TOKENS):
        assert r.output_ids == alone(m, p, n)


def test_compiled_steps_give_what_generate_gives_alone(model):
    """``compile=True``: every bucket's step is compiled when the scheduler is built (the lengths that
    compiling advanced are reset), then staggered requests get their prompts' greedy tokens alone."""
    sched = Scheduler(model, max_batch=2, max_model_len=48, compile=True, show_progress=False)
    assert sorted(sched._steps) == [1, 2] and all(s.compiled for s in sched._steps.values())
    assert not sched.cache.lengths_B.any()
    prompts, n = PROMPTS[:4], MAX_TOKENS[:4]
    reqs = staggered(sched, prompts, [SamplingParams(max_tokens=k) for k in n])
    for req, p, k in zip(reqs, prompts, n):
        assert req.output_ids == alone(model, p, k), req.id
    with pytest.raises(AdmissionError, match="speculative"):
        Scheduler(model, max_batch=2, compile=True, speculative=True)
