"""``moge serve`` over HTTP with real clients: the official openai client (sync, async, streaming;
completions and chat) gets what the library gives; echo logprobs are the forward's; 32 concurrent
clients; a disconnect frees its row; every bad request is a 4xx JSON error and the server keeps
serving; an engine failure fails its request alone; nothing is left behind; SIGTERM drains."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest
import torch

from helpers import single_thread  # noqa: F401
from moge.checkpoint import load_pretrained
from moge.cli import main as cli_main
from moge.engine.request import Request
from moge.engine.scheduler import Scheduler
from moge.generate import generate
from moge.serve.engine import Stream
from moge.serve.text import TextStream
from serve_helpers import MODEL, Server, ckpt, free_port  # noqa: F401 (ckpt: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["hello world", "the quick brown fox", "mixture of grouped experts", "pangu", "hello moge, hello",
           "jumps over the lazy dog", "balances devices", "text"]


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "4", "--max-model-len", "128", "--max-queue", "2000")
    yield s
    s.close()


@pytest.fixture(scope="module")
def library(ckpt):
    """What the library gives: ``(model, tokenizer, greedy(prompt_ids, n))``."""
    model = load_pretrained(ckpt)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))

    def greedy(ids, n):
        out = generate(model, torch.tensor([ids]), max_new_tokens=n, eos_token_id=2)[0, len(ids):].tolist()
        return out[:out.index(2) + 1] if 2 in out else out

    def encode(text):
        return [1] + tok.encode(text, add_special_tokens=False).ids

    return model, tok, encode, greedy


def client(server, cls=openai.OpenAI):
    return cls(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_completions_equal_the_library(server, library):
    model, tok, encode, greedy = library
    c = client(server)
    for text, n in zip(PROMPTS[:4], (5, 9, 3, 12)):
        r = c.completions.create(model=MODEL, prompt=text, max_tokens=n, temperature=0, logprobs=0)
        want = greedy(encode(text), n)
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
        assert r.choices[0].logprobs.tokens == [tok.decode([i], skip_special_tokens=False) for i in want]
        assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(encode(text))
        assert r.choices[0].finish_reason == ("stop" if want[-1] == 2 else "length")
    ids = encode(PROMPTS[1])  # token-id prompts, a batch of two
    r = c.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert [ch.text for ch in r.choices] == [tok.decode(greedy(p, 4), skip_special_tokens=True) for p in (ids, ids[:3])]


def test_echo_logprobs_are_the_forwards_log_softmax(server, library):
    model, tok, encode, greedy = library
    r = client(server).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=3, temperature=0, echo=True,
                                          logprobs=2)
    ids = encode(PROMPTS[2])
    full = ids + greedy(ids, 3)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), -1)
    got = r.choices[0].logprobs
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert len(got.token_logprobs) == len(full)
    for i in range(1, len(full)):
        assert got.token_logprobs[i] == pytest.approx(float(lp[i - 1, full[i]]), abs=1e-4)
        assert len(got.top_logprobs[i]) <= 2
    assert r.choices[0].text.startswith(PROMPTS[2])


def test_streaming_and_chat_match_the_non_streamed_answer(server, library):
    model, tok, encode, greedy = library
    c = client(server)
    whole = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10,
                                                                  temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == whole
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello moge"}]
    chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    prompt = [1] + tok.encode("system: be brief\nuser: hello moge\nassistant:", add_special_tokens=False).ids
    assert chat.choices[0].message.content == tok.decode(greedy(prompt, 6), skip_special_tokens=True)
    assert chat.usage.prompt_tokens == len(prompt)
    streamed = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_sse_ends_with_done(server):
    status, text = server.raw("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}).encode())
    assert status == 200 and text.rstrip().endswith("data: [DONE]")


def test_seeded_sampling_is_reproducible_and_n_choices_differ(server):
    c = client(server)
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=1.5, top_p=0.95, seed=11,
              extra_body={"top_k": 40})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    three = c.completions.create(**{**kw, "max_tokens": 12}, n=3)
    assert len(three.choices) == 3 and len({ch.text for ch in three.choices}) > 1


def test_32_concurrent_async_clients_get_the_library_answers(server, library):
    model, tok, encode, greedy = library
    want = {p: tok.decode(greedy(encode(p), 6), skip_special_tokens=True) for p in PROMPTS}

    async def main():
        c = client(server, openai.AsyncOpenAI)

        async def one(i):
            p = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                r = await c.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
                return p, r.choices[0].text
            s = await c.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0, stream=True)
            return p, "".join([ch.choices[0].text async for ch in s if ch.choices])

        return await asyncio.gather(*(one(i) for i in range(32)))

    for p, text in asyncio.run(main()):
        assert text == want[p], p
    assert server.engine.scheduler.num_running == 0


def aborted(server) -> float:
    """How many requests the server has aborted so far (its metrics' counter)."""
    return server.engine.metrics.finished.labels("abort")._value.get()


def generated(server) -> float:
    """How many tokens the server has generated so far (its metrics' counter)."""
    return server.engine.metrics.generation_tokens._value.get()


def wait_for_abort(server, before: float) -> None:
    """Wait up to 5 s for one more abort. The scheduler frees a row and then tells its request, so the
    abort counter, not the row count, is what to wait for (the row is free once the abort is counted)."""
    deadline = time.time() + 5
    while aborted(server) < before + 1 and time.time() < deadline:
        time.sleep(0.01)


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes at least 20 ms: a 120-token answer takes > 2.4 s, and "within a step"
    is measurable in tokens."""
    real = Scheduler._decode

    def slow(self, decoding):
        time.sleep(0.02)
        return real(self, decoding)

    monkeypatch.setattr(Scheduler, "_decode", slow)


def test_disconnect_mid_stream_frees_its_row_within_a_step(server, slow_steps):
    sched = server.engine.scheduler
    before = aborted(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 120,
                                                             "stream": True, "ignore_eos": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()  # the first event is there: the request holds a row
    assert sched.num_running == 1
    at_close = generated(server)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for_abort(server, before)
    assert aborted(server) == before + 1 and sched.num_running == 0  # aborted, not run to its end
    # the step running when the client left, and at most one more before the abort lands
    assert generated(server) - at_close <= 2


def test_disconnect_while_waiting_for_a_whole_answer_frees_its_row_within_a_step(server, slow_steps):
    sched = server.engine.scheduler
    before = aborted(server)
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 120, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.time() + 5
    while not sched.num_running and time.time() < deadline:
        time.sleep(0.005)
    assert sched.num_running == 1
    at_close = generated(server)
    sock.close()  # gone before the answer: the handler hears http.disconnect and aborts
    wait_for_abort(server, before)
    assert aborted(server) == before + 1 and sched.num_running == 0
    assert generated(server) - at_close <= 2


BAD = [
    (b'{"prompt": "hi", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"prompt": 12}', 400, "prompt"),
    (b'{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 100000}', 400, "context"),
    (b'{"prompt": "hi", "temperature": -3}', 400, "temperature"),
    (b'{"prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "hi", "top_k": -2}', 400, "top_k"),
    (b'{"prompt": "hi", "logprobs": 50}', 400, "logprobs"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": []}', 400, "empty"),
    (b'{"max_tokens": 3}', 400, "prompt"),
    (json.dumps({"prompt": "hello " * 200}).encode(), 400, "context"),
    (b'{"prompt": [1, 99999]}', 400, "vocabulary"),
    (b'{"prompt": "hi", "model": "gpt-4"}', 404, "does not exist"),
    (b'{"prompt": "caf\xe9 \xff"}', 400, "JSON"),
    (b'{"prompt": "hi", ', 400, "JSON"),
    (b'[1, 2]', 400, ""),
    (b'{"prompt": "hi", "n": 1000}', 400, "n"),
    (b'{"prompt": "hi", "stop": [""]}', 400, "stop"),
    (b'{"prompt": "hi", "presence_penalty": 1.0}', 400, "presence_penalty"),
    (b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413, "over"),
]


@pytest.mark.parametrize("body,status,word", BAD, ids=range(len(BAD)))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, word):
    got, err = server.raw("POST", "/v1/completions", body)
    assert got == status, err
    assert isinstance(err, dict) and set(err["error"]) >= {"message", "type", "code"} and err["error"]["code"] == status
    assert word.lower() in json.dumps(err).lower()
    ok, res = server.raw("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
    assert ok == 200 and res["usage"]["completion_tokens"] >= 1


def test_bad_chat_and_tokenizer_requests(server):
    for body in (b'{"messages": []}', b'{"messages": [{"role": "wizard", "content": "x"}]}',
                 b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'):
        status, err = server.raw("POST", "/v1/chat/completions", body)
        assert status == 400 and "error" in err, body
    assert server.raw("POST", "/detokenize", b'{"tokens": [-1]}')[0] == 400
    assert server.raw("GET", "/v1/nothing")[0] == 404


def test_tokenizer_routes_models_health_metrics(server, library):
    model, tok, encode, greedy = library
    status, r = server.raw("POST", "/tokenize", b'{"prompt": "hello world"}')
    assert status == 200 and r["tokens"] == encode("hello world") and r["count"] == len(r["tokens"])
    assert server.raw("POST", "/detokenize", json.dumps({"tokens": r["tokens"]}).encode())[1]["prompt"] == "hello world"
    info = server.raw("GET", "/tokenizer_info")[1]
    assert info["eos_token"] == "<eos>" and "assistant:" in info["chat_template"] and info["model_max_length"] == 128
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    assert server.raw("GET", "/health") == (200, {"status": "ok"})
    status, text = server.raw("GET", "/metrics")
    for name in ("moge_requests_running 0.0", "moge_requests_waiting 0.0", "moge_kv_rows_in_use 0.0",
                 "moge_time_to_first_token_seconds_bucket", "moge_time_per_output_token_seconds_bucket",
                 "moge_inter_token_latency_seconds_bucket", "moge_generation_tokens_total"):
        assert name in text, name


def test_an_engine_failure_fails_its_request_alone(server, monkeypatch):
    real = Scheduler._prefill_chunks

    def flaky(self, chunks):
        if any(77 in req.prompt_ids for req, _ in chunks):
            raise RuntimeError("injected fault")
        return real(self, chunks)

    monkeypatch.setattr(Scheduler, "_prefill_chunks", flaky)

    async def main():
        c = client(server, openai.AsyncOpenAI)
        bad = c.completions.create(model=MODEL, prompt=[1, 77, 5], max_tokens=4)
        good = [c.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in PROMPTS[:3]]
        return await asyncio.gather(bad, *good, return_exceptions=True)

    bad, *good = asyncio.run(main())
    assert isinstance(bad, openai.InternalServerError) and "injected fault" in str(bad)
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in good)
    assert server.raw("GET", "/health")[0] == 200


def test_many_requests_leave_no_row_or_queue_entry(server):
    async def main():
        c = client(server, openai.AsyncOpenAI)
        sem = asyncio.Semaphore(32)

        async def one(i):
            async with sem:
                r = await c.completions.create(model=MODEL, prompt=[1, 3 + i % 50], max_tokens=1 + i % 2)
                return r.usage.completion_tokens

        return await asyncio.gather(*(one(i) for i in range(1000)))

    assert all(n >= 1 for n in asyncio.run(main()))
    sched = server.engine.scheduler
    assert sched.num_running == 0 and sched.num_waiting == 0 and not sched.has_work()
    assert sched._rows == [None] * sched.max_batch and not sched._aborts
    gc.collect()  # and no request or stream object outlives its HTTP request
    assert not [o for o in gc.get_objects() if type(o) in (Request, Stream)]


def test_api_key_and_queue_bound(ckpt):
    s = Server(ckpt, "--api-key", "sesame", "--max-batch", "1", "--max-queue", "1")
    try:
        assert s.raw("POST", "/v1/completions", b'{"prompt": "hi"}')[0] == 401
        assert s.raw("GET", "/health")[0] == 200
        ok = s.raw("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}',
                   headers={"Authorization": "Bearer sesame"})
        assert ok[0] == 200

        async def flood():
            c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
            return await asyncio.gather(*(c.completions.create(model=MODEL, prompt="hi", max_tokens=30,
                                                               extra_body={"ignore_eos": True}) for _ in range(6)),
                                        return_exceptions=True)

        results = asyncio.run(flood())
        assert any(isinstance(r, openai.RateLimitError) for r in results)
        assert any(not isinstance(r, Exception) for r in results)
    finally:
        s.close()


def test_cli_errors_and_sigterm_drains(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    assert cli_main(["serve", "missing-dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moge", "serve", ckpt.name, "--port", str(port), "--max-batch", "2"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hello", "max_tokens": 100, "stream": True,
                                                                 "ignore_eos": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.readline()
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        # uvicorn re-raises the signal once it has shut down gracefully: the status says SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chat_template_is_the_one_transformers_renders(ckpt, server):
    from transformers import AutoTokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello moge"}]
    hf = AutoTokenizer.from_pretrained(str(ckpt)).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert hf == "<bos>system: be brief\nuser: hello moge\nassistant:"
    assert server.app.state.tokenizer.render_chat(msgs, True) == hf


def test_stop_strings_cut_the_text_streamed_or_not(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=16, temperature=0).choices[0].text
    stop = full[4:6]
    assert len(stop) == 2 and stop in full
    want = full[:full.index(stop)]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=16, temperature=0, stop=[stop, "never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    parts = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=16,
                                                                  temperature=0, stop=stop, stream=True) if ch.choices]
    assert "".join(parts) == want


def test_text_stream_deltas_add_up_to_the_decoded_text(ckpt):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = "café naïve 東京 — hello moge 🙂 the quick brown fox"
    ids = tok.encode(text, add_special_tokens=False).ids

    def decode(x):
        return tok.decode(x, skip_special_tokens=True)

    stream = TextStream(decode)
    parts = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(parts) == text and all("\ufffd" not in p for p in parts)
    for stop in ("東京", "moge 🙂", "fox", "absent"):
        stream = TextStream(decode, (stop, "zzz"))
        got = "".join(stream.push(i) for i in ids) + stream.finish()
        assert got == text[:text.find(stop)] if stop in text else got == text


def test_compiled_server_answers_what_the_library_gives(ckpt, library, capsys):
    """``moge serve --compile``: the decode steps are compiled before the server answers, and its greedy
    completions equal the library's; ``--compile --speculative`` is refused with a named error."""
    model, tok, encode, greedy = library
    s = Server(ckpt, "--compile", "--max-batch", "2", "--max-model-len", "64")
    try:
        assert all(step.compiled for step in s.engine.scheduler._steps.values())
        c = client(s)
        for text, n in zip(PROMPTS[:3], (6, 3, 9)):
            r = c.completions.create(model=MODEL, prompt=text, max_tokens=n, temperature=0)
            assert r.choices[0].text == tok.decode(greedy(encode(text), n), skip_special_tokens=True)
    finally:
        s.close()
    assert cli_main(["serve", str(ckpt), "--compile", "--speculative"]) == 2
    assert "use one or the other" in capsys.readouterr().err


def test_engine_thread_runs_every_call_on_one_thread_and_hands_back_errors():
    """``moge serve`` loads, builds and steps the model on one thread (torch's kernels slow down on a
    thread other than the one that first used them): calls run there in order; errors come back."""
    import threading

    from moge.serve.engine import EngineThread
    worker = EngineThread()
    idents = [worker.call(threading.get_ident) for _ in range(3)]
    assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
    assert worker.call(lambda: torch.ones(3).sum().item()) == 3.0
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    assert worker.call(lambda: "still serving") == "still serving"
