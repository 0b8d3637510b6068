"""Kernel choices made by measurement, owned by a model: which few-rows matmul kernel and which decode
experts backend this CPU runs faster, per call shape.

Both choices are made on the real calls: the first calls of a key (a weight shape, row count, dtype,
thread count) alternate between the candidates, each timed, :data:`TUNE_REPEATS` per candidate, and
the fastest is kept for that key. Nothing is computed twice: the trial calls are the real calls.
Timing real calls matters because a decode step streams more weights than the CPU caches hold, and a
kernel timed repeatedly on one hot weight can win there and lose on the cold weights of a real step.

The choices live in a :class:`KernelChoices` object, never in the process: every native model owns one
(``model.kernels``, attached to its linear and experts modules by :func:`use_kernels`), so two models in
one process measure separately and a test or benchmark can pin a kernel on one model without touching
another. ``pin`` fixes a choice, ``state_dict``/``load_state_dict`` save and restore what was measured
(e.g. to skip the trial calls of a server's warm-up on the next start). A module without a
``KernelChoices`` (``kernels is None``) measures nothing and takes the deterministic default.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError


__all__ = ["KINDS", "TUNE_REPEATS", "KernelChoices", "MeasuredChoice", "timed_trial", "use_kernels"]

# Timed real calls per candidate when a key is first seen (the best of them counts).
TUNE_REPEATS = 3
# What is chosen, and among which candidates.
KINDS: dict[str, tuple[str, ...]] = {"few_rows": ("linear", "wxt"), "decode_experts": ("gemv", "grouped_mm")}


def timed_trial(trials: dict[str, list], candidates: Mapping[str, Callable[[], object]],
                repeats: int = TUNE_REPEATS) -> tuple[object, str | None]:
    """Run the candidate tried least so far (``trials``: name -> ``[best time, calls]``, updated in
    place) and time it; returns ``(its result, the winner)``, the winner being None until every
    candidate has been timed ``repeats`` times."""
    name = min(candidates, key=lambda c: trials.setdefault(c, [float("inf"), 0])[1])
    t0 = time.perf_counter()
    out = candidates[name]()
    dt = time.perf_counter() - t0
    rec = trials[name]
    rec[0], rec[1] = min(rec[0], dt), rec[1] + 1
    done = all(trials[c][1] >= repeats for c in candidates)
    return out, (min(candidates, key=lambda c: trials[c][0]) if done else None)


class MeasuredChoice:
    """Per-key choices among interchangeable candidates, each made by :func:`timed_trial` on the key's
    first real calls and then kept."""

    def __init__(self, repeats: int = TUNE_REPEATS) -> None:
        self.repeats = repeats
        self.chosen: dict[str, str] = {}
        self._trials: dict[str, dict[str, list]] = {}  # key -> name -> [best time, calls], until chosen

    def get(self, key: str) -> str | None:
        """The candidate chosen for ``key``, or None while it is still being measured."""
        return self.chosen.get(key)

    def measure(self, key: str, candidates: Mapping[str, Callable[[], object]]) -> object:
        """One timed trial call for ``key`` (its real result); keeps the winner once every candidate
        has been timed ``repeats`` times."""
        y, winner = timed_trial(self._trials.setdefault(key, {}), candidates, self.repeats)
        if winner is not None:
            self.chosen[key] = winner
            del self._trials[key]
        return y

    def clear(self) -> None:
        self.chosen.clear()
        self._trials.clear()


class KernelChoices:
    """A model's measured kernel choices, one :class:`MeasuredChoice` per kind in :data:`KINDS`, each
    of which can be pinned to one candidate instead (``KernelChoices(few_rows="wxt")``)."""

    def __init__(self, repeats: int = TUNE_REPEATS, **pinned: str | None) -> None:
        self.measured = {kind: MeasuredChoice(repeats) for kind in KINDS}
        self.pinned: dict[str, str | None] = {kind: None for kind in KINDS}
        for kind, name in pinned.items():
            self.pin(kind, name)

    def pin(self, kind: str, name: str | None) -> None:
        """Fix ``kind``'s choice to ``name`` for every key; ``None``/``"auto"`` measures again. Either way
        what was measured for ``kind`` so far is forgotten."""
        if kind not in KINDS:
            raise InvalidArgumentError(f"kernel kind must be one of {list(KINDS)}, got {kind!r}")
        if name not in (None, "auto", *KINDS[kind]):
            raise InvalidArgumentError(f"{kind} kernel must be one of {['auto', *KINDS[kind]]}, got {name!r}")
        self.pinned[kind] = None if name in (None, "auto") else name
        self.measured[kind].clear()

    def get(self, kind: str, key: str) -> str | None:
        """The candidate ``kind`` uses for ``key``: the pinned one, else the measured one, else None
        while ``key``'s first calls are still being timed."""
        return self.pinned[kind] or self.measured[kind].get(key)

    def run(self, kind: str, key: str, candidates: Mapping[str, Callable[[], object]]) -> object:
        """Call the candidate chosen for ``key``, or, while there is none, one timed trial call."""
        name = self.get(kind, key)
        if name is not None:
            return candidates[name]()
        return self.measured[kind].measure(key, candidates)

    def state_dict(self) -> dict[str, Any]:
        """What was pinned and measured, as plain JSON-able data."""
        return {"pinned": dict(self.pinned), "chosen": {k: dict(m.chosen) for k, m in self.measured.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (unknown kinds or candidates raise a named error)."""
        for kind, name in dict(state.get("pinned", {})).items():
            self.pin(kind, name)
        for kind, chosen in dict(state.get("chosen", {})).items():
            if kind not in KINDS or not all(v in KINDS[kind] for v in dict(chosen).values()):
                raise InvalidArgumentError(f"kernel choices: unknown kind or candidate in {kind!r}: {chosen!r}")
            self.measured[kind].chosen.update(chosen)


def use_kernels(module: nn.Module, kernels: KernelChoices | None) -> None:
    """Make every submodule of ``module`` that takes measured kernels (``Linear``, stacked experts) use
    ``kernels`` (None: none of them measures)."""
    for m in module.modules():
        if getattr(type(m), "takes_kernels", False):
            m.kernels = kernels
