"""What a request is to the continuous-batching scheduler: its settings, its state, the events it hears,
and the two ways admission refuses one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import MoGEError

__all__ = ["AdmissionError", "Event", "QueueFullError", "Request", "SamplingParams"]


class AdmissionError(MoGEError, ValueError):
    """A request the scheduler cannot take (too long for the context, bad settings); a client error."""


class QueueFullError(MoGEError, RuntimeError):
    """The waiting queue holds ``max_queue`` requests already; retry later (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off;
    ``seed`` gives the request its own generator (same seed, same prompt: same tokens); ``logprobs``
    (top-N, 0 = the chosen token's only) for each new token, ``prompt_logprobs`` likewise for the prompt."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class Event:
    """What a request hears after a step: a new ``token`` (with its log-probability and top-N when asked),
    the prompt's log-probabilities (once, before the first token), and ``finish_reason`` on the last
    event: ``"stop"`` (EOS, a stop id or string), ``"length"``, ``"abort"`` or ``"error"`` (``error``
    says why)."""

    token: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A request's state inside the scheduler; ``output_ids`` grows as it decodes."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    row: int | None = None
    prefilled: int = 0
    finished: bool = False
    generator: torch.Generator | None = None
    _prompt_lp: list = field(default_factory=list)
