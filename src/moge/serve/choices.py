"""From engine events to OpenAI response objects: one :class:`Choice` per (prompt, n) pair.

A choice folds its request's events into text (through :class:`~moge.serve.text.TextStream`),
token log-probabilities and a finish reason; :func:`collect` waits for every choice of a request,
:func:`merged` yields ``(choice, delta)`` as events arrive for streaming. Both close every stream
when they end, however they end, so an abandoned request frees its row (the disconnect path).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ..engine.scheduler import Event
from .engine import Stream
from .protocol import ServeError
from .text import ServeTokenizer, TextStream

__all__ = ["Choice", "collect", "completion_logprobs", "chat_logprobs", "merged"]


class Choice:
    """The state of one choice: ``index`` in the response, its prompt, its stream, what came back."""

    def __init__(self, index: int, prompt_ids: list[int], stream: Stream, tok: ServeTokenizer,
                 stops: tuple[str, ...]):
        self.index, self.prompt_ids, self.stream, self.tok = index, prompt_ids, stream, tok
        self.text = TextStream(tok.decode, stops)
        self.tokens: list[int] = []
        self.logprobs: list[float | None] = []
        self.top: list[dict[int, float] | None] = []
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None

    def fold(self, ev: Event) -> str:
        """Take one event; the new text that may be sent."""
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        delta = ""
        if ev.token is not None:
            self.tokens.append(ev.token)
            self.logprobs.append(ev.logprob)
            self.top.append(ev.top_logprobs)
            delta = self.text.push(ev.token)
        if ev.finish_reason == "error":
            raise ServeError(500, f"the engine failed on this request: {ev.error}", kind="server_error")
        if ev.finish_reason is not None:
            self.finish_reason = "stop" if ev.finish_reason in ("stop", "abort") else ev.finish_reason
            delta += self.text.finish()
        return delta


async def collect(choices: list[Choice]) -> None:
    """Fold every event of every choice until all have finished; closes the streams at the end."""
    async def one(c: Choice):
        while c.finish_reason is None:
            c.fold(await c.stream.next())

    try:
        await asyncio.gather(*(one(c) for c in choices))
    finally:
        for c in choices:
            c.stream.close()


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, str, Event]]:
    """``(choice, text delta, event)`` in arrival order across the choices; closes the streams at the end."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        while True:
            ev = await c.stream.next()
            await queue.put((c, ev))
            if ev.finish_reason is not None:
                return

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            c, ev = await queue.get()
            delta = c.fold(ev)
            left -= c.finish_reason is not None
            yield c, delta, ev
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            c.stream.close()


def _top_dict(tok: ServeTokenizer, top: dict[int, float] | None) -> dict[str, float] | None:
    return None if top is None else {tok.piece(i): lp for i, lp in top.items()}


def completion_logprobs(c: Choice, echo: bool, start: int = 0, offset: int = 0) -> dict:
    """The completions API's ``logprobs`` object (tokens from ``start`` of the output; with ``echo``
    the prompt's tokens first, the first one's log-probability null)."""
    ids, lps, tops = [], [], []
    if echo:
        ids += c.prompt_ids
        plp = c.prompt_logprobs or [None] * len(c.prompt_ids)
        lps += [None if p is None else p[0] for p in plp]
        tops += [None if p is None else _top_dict(c.tok, p[1]) for p in plp]
    ids += c.tokens[start:]
    lps += c.logprobs[start:]
    tops += [_top_dict(c.tok, t) for t in c.top[start:]]
    pieces = [c.tok.piece(i) for i in ids]
    offsets = []
    for p in pieces:
        offsets.append(offset)
        offset += len(p)
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: Choice, start: int = 0) -> dict:
    """The chat API's ``logprobs`` object for the output tokens from ``start``."""
    def entry(i: int, lp: float) -> dict:
        s = c.tok.piece(i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    out = []
    for i, lp, top in zip(c.tokens[start:], c.logprobs[start:], c.top[start:]):
        out.append({**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in (top or {}).items()]})
    return {"content": out}
