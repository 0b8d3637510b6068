"""Hang detection for expert-parallel ranks: a heartbeat that names a hung (alive but stuck) rank long
before the collective timeout.

A dead rank is noticed at once (its sockets close); a *hung* one, a process that is alive but makes
no progress (a deadlock, a stuck read, an endless loop), leaves its peers waiting in a collective until
the timeout (120 s by default), and then nobody knows which rank it was. :class:`Heartbeat` runs a
daemon thread in every rank that, every ``interval`` seconds, samples the Python stack of the rank's
working thread and publishes to the rendezvous store whether that thread is inside a
``torch.distributed`` collective, for how long, and for how long its innermost frame has not moved.

* A rank outside every collective whose frame has not moved for ``hang_s`` while every other rank
  has waited in a collective for ``hang_s`` is the hung one: it records ``RankHungError`` (naming
  where it is stuck) as its failure and exits, so its peers' collectives fail at once and
  :func:`~moge.parallel.fault_guard` names it.
* A waiting rank that sees such a peer, or a peer whose heartbeat stopped (stopped by a signal, or
  stuck in native code holding the GIL), records the peer's failure and, if the peer does not end by
  itself within two intervals, ends this rank with the same message (a collective blocked in gloo
  cannot be interrupted from another thread).

Phases in which one rank legitimately works while the others wait (rank 0 training the tokenizer or
writing a checkpoint) are marked with :meth:`Heartbeat.busy`. Cost: one stack walk and ``world``
store reads per interval in a background thread; nothing on the training thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, Iterator

from ..errors import MoGEError

_HB_KEY = "moge/heartbeat/{}"
_C10D = os.path.join("torch", "distributed", "distributed_c10d.py")


class RankHungError(MoGEError, RuntimeError):
    """A rank is alive but has made no progress for the hang timeout while the others wait for it."""


class Heartbeat:
    """The watchdog thread of one rank (see the module docstring); a context manager."""

    def __init__(self, store: Any, rank: int, world: int, hang_s: float, fail_key: str,
                 interval: float | None = None, thread_id: int | None = None):
        self.store, self.rank, self.world, self.hang_s = store, rank, world, hang_s
        self.fail_key = fail_key
        self.interval = interval if interval is not None else max(0.25, min(2.0, hang_s / 5))
        self.thread_id = thread_id if thread_id is not None else threading.get_ident()
        self.suspects: dict[int, str] = {}  # peers this rank found hung or silent: rank -> why
        self._busy: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"moge-heartbeat-{rank}", daemon=True)
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (beat, local time it last changed)
        self._started = 0.0

    # ---- the working thread's side ----------------------------------------------------------------
    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """Mark a phase in which this rank works alone while the others wait (never called hung)."""
        self._busy.append(what)
        try:
            yield
        finally:
            self._busy.pop()

    def __enter__(self) -> "Heartbeat":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.set(_HB_KEY.format(self.rank), json.dumps({"done": True}))
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0
            pass

    # ---- the watchdog thread ---------------------------------------------------------------------
    def _sample(self) -> tuple[bool, str]:
        """(is the working thread inside a collective, its innermost frame as 'func (file:line)')."""
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return False, "?"
        where = f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        f = frame
        while f is not None:
            if f.f_code.co_filename.endswith(_C10D):
                return True, where
            f = f.f_back
        return False, where

    def _run(self) -> None:
        beat, coll_since, where_since, last_where, flagged_at = 0, None, time.monotonic(), None, None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            in_coll, where = self._sample()
            coll_since = (coll_since or now) if in_coll else None
            if where != last_where:
                last_where, where_since = where, now
            beat += 1
            me = {"n": beat, "coll": in_coll, "coll_for": now - coll_since if coll_since else 0.0,
                  "frozen_for": now - where_since, "where": where, "busy": self._busy[-1] if self._busy else None}
            try:
                self.store.set(_HB_KEY.format(self.rank), json.dumps(me))
                peers = self._read_peers(now)
            except Exception:  # noqa: BLE001 - the store went away (rank 0 ended): nothing left to watch
                return
            if self._i_am_hung(me, peers):
                self._end(f"rank {self.rank} is hung: alive but stuck in {where}, outside any collective, for "
                          f"{me['frozen_for']:.1f} s while ranks {sorted(peers)} wait for it (hang timeout "
                          f"{self.hang_s:g} s)", self.rank)
            if me["coll"] and me["coll_for"] >= self.hang_s:
                self._flag_peers(peers, now)
                if self.suspects:
                    flagged_at = flagged_at or now
                    if now - flagged_at >= 3 * self.interval + 1.0:  # the suspect did not end by itself
                        r, why = sorted(self.suspects.items())[0]
                        self._end(why, r)
            else:
                flagged_at = None

    def _read_peers(self, now: float) -> dict[int, dict | None]:
        """Each live peer's last record (None: no heartbeat for ``hang_s``); finished peers are left out."""
        out: dict[int, dict | None] = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            key = _HB_KEY.format(r)
            rec = json.loads(self.store.get(key)) if self.store.check([key]) else None
            if rec is not None and rec.get("done"):
                continue
            n = rec["n"] if rec else -1
            last = self._seen.get(r)
            if last is None or last[0] != n:
                self._seen[r] = (n, now)
            silent = now - self._seen[r][1] >= self.hang_s and now - self._started >= self.hang_s
            out[r] = None if silent else rec
        return out

    def _i_am_hung(self, me: dict, peers: dict[int, dict | None]) -> bool:
        waiting = [p for p in peers.values() if p is not None and p["coll"] and p["coll_for"] >= self.hang_s]
        # One interval later than the peers flag it: they hold the name even if this rank hosts the store.
        return (not me["coll"] and me["busy"] is None and me["frozen_for"] >= self.hang_s + self.interval
                and bool(peers) and len(waiting) == len(peers))

    def _flag_peers(self, peers: dict[int, dict | None], now: float) -> None:
        for r, p in peers.items():
            if p is None:
                self.suspects[r] = (f"rank {r} stopped responding: no heartbeat for {self.hang_s:g} s while rank "
                                    f"{self.rank} waits for it in a collective (stopped, or stuck in native code)")
            elif not p["coll"] and p["busy"] is None and p["frozen_for"] >= self.hang_s:
                self.suspects[r] = (f"rank {r} is hung: alive but stuck in {p['where']}, outside any collective, "
                                    f"for {p['frozen_for']:.1f} s while rank {self.rank} waits for it "
                                    f"(hang timeout {self.hang_s:g} s)")

    def _end(self, why: str, culprit: int) -> None:
        """Record the culprit's failure (unless it recorded one) and end this process at once."""
        try:
            key = self.fail_key.format(culprit)
            if not self.store.check([key]):
                self.store.set(key, f"{RankHungError.__name__}: {why}"[:500])
        except Exception:  # noqa: BLE001
            pass
        print(f"[rank {self.rank}] {RankHungError.__name__}: {why}; ending rank {self.rank}", file=sys.stderr,
              flush=True)
        if culprit != self.rank:
            time.sleep(1.0)  # rank 0 may host the store: let the others read the record
        sys.stdout.flush()
        os._exit(3)
