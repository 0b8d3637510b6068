"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``: request -> engine streams -> response.

Each (prompt, n) pair is one engine request (its own row, its own seed ``seed + choice``). Nothing is
submitted until every prompt passed the context check, and a failed submit closes the ones already
made, so a refused request leaves no row or queue entry behind. Streaming answers are server-sent
events ending in ``data: [DONE]``; the response generator's ``finally`` closes the streams, so a
client that goes away mid-stream aborts its requests (their rows are free by the next step). A
non-streaming request's handler awaits the server's ``http.disconnect`` message beside the answer, so
its disconnect aborts it as quickly.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.request import AdmissionError, QueueFullError
from .choices import Choice, chat_logprobs, collect, completion_logprobs, merged
from .engine import AsyncEngine
from .protocol import MAX_CHOICES, ChatRequest, CompletionRequest, ServeError, error_body, sampling_params
from .text import ServeTokenizer

__all__ = ["OpenAIRoutes"]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(choices: list[Choice], prompts: list[list[int]]) -> dict:
    p, c = sum(map(len, prompts)), sum(len(x.tokens) for x in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _abort_on_disconnect(raw: Request, choices: list[Choice]) -> None:
    """Close the choices' streams (aborting their requests) the moment the client goes away.

    The body is read before the handler runs, so the next ASGI message is ``http.disconnect``: the
    server sends it when the connection is lost. Awaiting it, rather than polling
    ``Request.is_disconnected``, puts the abort in the scheduler within the step that is running
    (a poll every 50 ms let two or three more 20 ms steps run) and costs nothing while waiting.
    Cancelled by the handler once the answer is complete.
    """
    while (await raw.receive())["type"] != "http.disconnect":
        pass  # nothing else can come after a complete body; a server that sends more is ignored
    for c in choices:
        c.stream.close()


class OpenAIRoutes:
    """The OpenAI endpoints over one engine and tokenizer, serving the model as ``model_name``."""

    def __init__(self, engine: AsyncEngine, tokenizer: ServeTokenizer, model_name: str):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.max_model_len = engine.scheduler.max_model_len
        self.eos = tuple(engine.scheduler.eos)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ServeError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                             "model", "not_found_error")

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "moge", "max_model_len": self.max_model_len}]}

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tok.encode(prompt)]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], str):
            return [self.tok.encode(p) for p in prompt]
        return [list(p) for p in prompt]

    def _submit(self, req, prompts: list[list[int]], max_tokens: list[int], logprobs, prompt_logprobs) -> list[Choice]:
        if len(prompts) * req.n > MAX_CHOICES:
            raise ServeError(400, f"prompts x n = {len(prompts) * req.n} is over this server's {MAX_CHOICES} choices "
                             "per request", "n")
        params = [sampling_params(req, mt, j, logprobs, prompt_logprobs) for mt in max_tokens for j in range(req.n)]
        try:
            for p, sp in zip([p for p in prompts for _ in range(req.n)], params):
                self.engine.scheduler.check(p, sp)
        except AdmissionError as e:
            raise ServeError(400, str(e), "prompt") from None
        choices: list[Choice] = []
        try:
            for i, (p, sp) in enumerate(zip([p for p in prompts for _ in range(req.n)], params)):
                choices.append(Choice(i, p, self.engine.submit(p, sp), self.tok, req.stops()))
        except (AdmissionError, QueueFullError) as e:
            for c in choices:
                c.stream.close()
            raise ServeError(429 if isinstance(e, QueueFullError) else 400, str(e)) from None
        return choices

    def _head(self, kind: str) -> dict:
        return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        prompts = self._prompts(req.prompt)
        max_tokens = [req.max_tokens or max(self.max_model_len - len(p), 1) for p in prompts]
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        choices = self._submit(req, prompts, max_tokens, req.logprobs, prompt_lp)
        head = {**self._head("cmpl"), "object": "text_completion"}
        if req.stream:
            return StreamingResponse(self._stream_completion(req, head, choices, prompts), media_type="text/event-stream")
        watcher = asyncio.create_task(_abort_on_disconnect(raw, choices))
        try:
            await collect(choices)
        finally:
            watcher.cancel()
        out = []
        for c in choices:
            pre = self.tok.decode(c.prompt_ids) if req.echo else ""
            lp = None if req.logprobs is None else completion_logprobs(c, req.echo)
            out.append({"index": c.index, "text": pre + c.text.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**head, "choices": out, "usage": _usage(choices, prompts)}

    async def _stream_completion(self, req: CompletionRequest, head: dict, choices: list[Choice], prompts):
        sent = {c.index: 0 for c in choices}
        try:
            if req.echo:
                for c in choices:
                    lp = None if req.logprobs is None else completion_logprobs(c, True, len(c.tokens))
                    yield _sse({**head, "choices": [{"index": c.index, "text": self.tok.decode(c.prompt_ids),
                                                     "logprobs": lp, "finish_reason": None}]})
            async for c, delta, ev in merged(choices):
                if not delta and c.finish_reason is None:
                    continue
                lp = None if req.logprobs is None else completion_logprobs(c, False, sent[c.index])
                sent[c.index] = len(c.tokens)
                yield _sse({**head, "choices": [{"index": c.index, "text": delta, "logprobs": lp,
                                                 "finish_reason": c.finish_reason}]})
            if (req.stream_options or {}).get("include_usage"):
                yield _sse({**head, "choices": [], "usage": _usage(choices, prompts)})
        except ServeError as e:
            yield _sse(error_body(e.status, e.message, e.kind))
        yield "data: [DONE]\n\n"

    async def chat(self, req: ChatRequest, raw: Request):
        self.check_model(req.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise ServeError(400, str(e), "messages") from None
        prompt = self.tok.encode(self.tok.render_chat(messages, req.add_generation_prompt), add_special_tokens=False)
        if len(prompt) >= self.max_model_len:
            raise ServeError(400, f"this model's context is {self.max_model_len} tokens; the messages take "
                             f"{len(prompt)}", "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or self.max_model_len - len(prompt)
        top = (req.top_logprobs or 0) if req.logprobs else None
        choices = self._submit(req, [prompt], [max_tokens], top, None)
        head = {**self._head("chatcmpl")}
        if req.stream:
            return StreamingResponse(self._stream_chat(req, head, choices, [prompt]), media_type="text/event-stream")
        watcher = asyncio.create_task(_abort_on_disconnect(raw, choices))
        try:
            await collect(choices)
        finally:
            watcher.cancel()
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                "logprobs": chat_logprobs(c) if req.logprobs else None, "finish_reason": c.finish_reason}
               for c in choices]
        return {**head, "object": "chat.completion", "choices": out, "usage": _usage(choices, [prompt])}

    async def _stream_chat(self, req: ChatRequest, head: dict, choices: list[Choice], prompts):
        head = {**head, "object": "chat.completion.chunk"}
        sent = {c.index: 0 for c in choices}
        try:
            for c in choices:
                yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            async for c, delta, ev in merged(choices):
                if not delta and c.finish_reason is None:
                    continue
                lp = chat_logprobs(c, sent[c.index]) if req.logprobs else None
                sent[c.index] = len(c.tokens)
                yield _sse({**head, "choices": [{"index": c.index, "delta": {"content": delta} if delta else {},
                                                 "logprobs": lp, "finish_reason": c.finish_reason}]})
            if (req.stream_options or {}).get("include_usage"):
                yield _sse({**head, "choices": [], "usage": _usage(choices, prompts)})
        except ServeError as e:
            yield _sse(error_body(e.status, e.message, e.kind))
        yield "data: [DONE]\n\n"
