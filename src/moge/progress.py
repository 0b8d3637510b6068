"""Progress of long jobs, readable wherever the output goes.

In a terminal a job shows a tqdm bar. When standard error is not a terminal (a log file, a pipe, CI),
bars would interleave carriage-return frames of several jobs on one line; instead each job prints one
complete line per interval, ``[label] step 120/400 (30%) 3.2 step/s ETA 1m27s loss=4.210``, written in a
single call so lines of parallel jobs never mix. Both expose the tqdm subset the jobs use:
``update``, ``set_postfix``, ``write`` and ``close``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LogProgress:
    """Line-per-interval progress for logs: step, rate, ETA and the latest postfix values."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, interval: float = 10.0,
                 file: TextIO | None = None, disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file, self.disable = interval, file or sys.stderr, disable
        self._start_n, self._start = initial, time.monotonic()
        self._last = self._start
        self._postfix: dict[str, Any] = {}
        self._closed = False

    def line(self) -> str:
        """The progress line as it would be printed now."""
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"[{self.desc}] {self.unit} {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:.0f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return " ".join(parts)

    def _emit(self, text: str) -> None:
        if not self.disable:
            self.file.write(text + "\n")  # one write per line: parallel jobs' lines stay whole
            self.file.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(self.line())

    def set_postfix(self, **values: Any) -> None:
        self._postfix = values

    def write(self, text: str) -> None:
        self._emit(f"[{self.desc}] {text}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._start_n:
                self._emit(self.line() + " done" if self.total is None or self.n >= self.total else self.line())

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", *, disable: bool = False, initial: int = 0,
             position: int | None = None, interval: float = 10.0, file: TextIO | None = None, **tqdm_kwargs):
    """A progress reporter for a job of ``total`` units: a tqdm bar when ``file`` (default standard
    error) is a terminal, else a :class:`LogProgress` that prints one line per ``interval`` seconds and a
    last one on close. ``desc`` names the job on every line, so several jobs can share one log."""
    out = file or sys.stderr
    if hasattr(out, "isatty") and out.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, position=position,
                    file=out, dynamic_ncols=True, **tqdm_kwargs)
    return LogProgress(total, desc, unit, initial=initial, interval=interval, file=out, disable=disable)
