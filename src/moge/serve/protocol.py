"""The OpenAI-compatible request bodies (pydantic, strict JSON types) and the error shape.

Every field a client may send is checked here, before the engine sees anything: wrong JSON types,
out-of-range sampling values, an empty prompt and ``n`` above the server's limit are each a 400 with
an OpenAI-shaped body, ``{"error": {"message", "type", "param", "code"}}``. Fields of the OpenAI API
the server does not implement (``user``, ``presence_penalty`` ...) are accepted and ignored when
they hold their neutral value, refused otherwise, so a client never silently gets something else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.scheduler import SamplingParams

__all__ = ["ChatRequest", "CompletionRequest", "DetokenizeRequest", "ServeError", "TokenizeRequest",
           "error_body", "sampling_params"]

MAX_N = 16
MAX_LOGPROBS = 20
TokenId = Annotated[int, Field(ge=0)]


class ServeError(Exception):
    """A request the server refuses: ``status`` (4xx, or 500 for an engine failure) and a message."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """The OpenAI error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off (vLLM's and transformers' spellings)
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @model_validator(mode="after")
    def _neutral_extras(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes at most 8 non-empty strings")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids or lists of them."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _prompt_not_empty(self):
        p = self.prompt
        if (isinstance(p, str) and not p) or (isinstance(p, list) and (not p or any(not x for x in p))):
            raise ValueError("prompt is empty: give a non-empty string or at least one token id")
        if isinstance(p, list) and len(p) > MAX_N and not isinstance(p[0], int):
            raise ValueError(f"at most {MAX_N} prompts per request")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = [c.get("text") for c in self.content]
            if any(c.get("type") != "text" or not isinstance(t, str) for c, t in zip(self.content, parts)):
                raise ValueError("only text content parts are supported")
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    tokens: list[TokenId]


def sampling_params(req: _Sampling, max_tokens: int, choice: int, logprobs: int | None,
                    prompt_logprobs: int | None, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """The engine's settings for choice ``choice`` of a request: with a seed and ``n > 1`` each choice
    gets ``seed + choice`` (the same seed would make every choice the same)."""
    seed = None if req.seed is None else (req.seed + choice) % 2 ** 63
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=max(req.top_k, 0), seed=seed, stop=req.stops(),
                          stop_token_ids=tuple(req.stop_token_ids or ()) + stop_token_ids,
                          ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
