"""The engine thread: one background thread owns the model and runs the scheduler; HTTP handlers talk
to it through queues.

:meth:`AsyncEngine.submit` checks and queues a request (raising at once for a client error or a full
queue) and returns a :class:`Stream` whose events arrive on the handler's asyncio loop
(``call_soon_threadsafe``). Closing a stream before its last event aborts the request, so the row is
free by the next step. The thread sleeps while there is no work. :meth:`AsyncEngine.stop` with
``drain`` lets running and queued requests finish first (what SIGTERM does through the server's
lifespan). Metrics (Prometheus, one registry per engine, so two servers in one process do not mix):
running / waiting requests and KV rows in use read from the scheduler when scraped; prompt and
generated token counters; TTFT, TPOT (per request) and inter-token latency histograms measured on the
engine thread when each event is produced.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.request import Event, SamplingParams
from ..engine.scheduler import Scheduler

__all__ = ["AsyncEngine", "EngineThread", "Stream"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class _Metrics:
    def __init__(self, scheduler: Scheduler):
        self.registry = r = CollectorRegistry()
        Gauge("moge_requests_running", "Requests holding a KV row (prefilling or decoding)",
              registry=r).set_function(lambda: scheduler.num_running)
        Gauge("moge_requests_waiting", "Requests in the FCFS queue", registry=r).set_function(lambda: scheduler.num_waiting)
        Gauge("moge_kv_rows_in_use", "Rows of the static KV cache in use", registry=r).set_function(
            lambda: scheduler.num_running)
        Gauge("moge_kv_rows_total", "Rows of the static KV cache (--max-batch)", registry=r).set(scheduler.max_batch)
        self.prompt_tokens = Counter("moge_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("moge_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("moge_requests_finished", "Finished requests by reason", ["finish_reason"], registry=r)
        self.ttft = Histogram("moge_time_to_first_token_seconds", "Submit to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("moge_time_per_output_token_seconds", "Per request: (last - first token) / "
                              "(tokens - 1)", registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("moge_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             registry=r, buckets=_LATENCY_BUCKETS)


class Stream:
    """The events of one request, read with ``await stream.next()``; ``close()`` aborts it if unfinished."""

    def __init__(self, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self._engine, self._loop = engine, loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request = None
        self.done = False
        self._t0 = time.perf_counter()
        self._last: float | None = None
        self._first: float | None = None
        self._n = 0

    def on_event(self, ev: Event) -> None:
        """Engine thread: record latencies, hand the event to the handler's loop."""
        now, m = time.perf_counter(), self._engine.metrics
        if ev.token is not None:
            self._n += 1
            m.generation_tokens.inc()
            if self._last is None:
                self._first = now
                m.ttft.observe(now - self._t0)
            else:
                m.itl.observe(now - self._last)
            self._last = now
        if ev.finish_reason is not None:
            m.finished.labels(ev.finish_reason).inc()
            if self._n > 1:
                m.tpot.observe((self._last - self._first) / (self._n - 1))
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)

    async def next(self) -> Event:
        ev = await self._queue.get()
        if ev.finish_reason is not None:
            self.done = True
        return ev

    def close(self) -> None:
        if not self.done and self.request is not None:
            self.done = True
            self._engine.abort(self.request.id)


class EngineThread:
    """One daemon thread that runs the callables given to it, in order: all of a server's torch work
    (loading the model, building the scheduler and compiling its steps, then the engine loop).

    Why one thread for all of it: torch's OpenMP and MKL kernels ran about 2x slower on a thread other
    than the one that built the model and first ran it (2 threads, the 2-core AMD EPYC VM: a ``small``
    float32 decode step 22.5 ms there, 46.1 ms on a second thread, ``benchmarks/probe_step.py``), so a
    model loaded on the main thread and stepped on an engine thread decoded at half speed (``moge serve``
    at 50-57% of the engine's own batch; docs/serving.md, "Measured")."""

    def __init__(self, name: str = "moge-engine"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, fut = self._calls.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to whoever waits on the future
                    fut.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the thread and return its result (or raise its exception) here."""
        return self.submit(fn).result()


class AsyncEngine:
    """A :class:`Scheduler` stepped by one background thread (see the module docstring): ``thread``, the
    :class:`EngineThread` that built the scheduler's model (``moge serve`` passes it), or a new one."""

    def __init__(self, scheduler: Scheduler, idle_wait: float = 0.05, thread: EngineThread | None = None):
        self.scheduler, self.idle_wait = scheduler, idle_wait
        self.metrics = _Metrics(scheduler)
        self._wake = threading.Event()
        self._stopping = False
        self._drain = True
        self._thread = thread or EngineThread()
        self._loop_done: Future | None = None
        self.error: str | None = None

    def start(self) -> None:
        self._loop_done = self._thread.submit(self._loop)

    @property
    def started(self) -> bool:
        return self._loop_done is not None

    @property
    def alive(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done() and not self._stopping

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
        """Queue a request; raises the scheduler's :class:`AdmissionError` / :class:`QueueFullError`."""
        stream = Stream(self, asyncio.get_running_loop())
        stream.request = self.scheduler.submit(prompt_ids, params, stream.on_event)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._wake.set()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread; with ``drain`` after the running and queued requests finish."""
        self._stopping, self._drain = True, drain
        self._wake.set()
        if self._loop_done is not None:
            wait([self._loop_done], timeout)

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            if self._stopping and (not self._drain or not sched.has_work()):
                return
            if not sched.has_work():
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            try:
                sched.step()
            except Exception:  # the scheduler isolates per-request failures; anything here is a bug
                self.error = traceback.format_exc(limit=3)
                time.sleep(self.idle_wait)  # do not spin on a persistent fault
