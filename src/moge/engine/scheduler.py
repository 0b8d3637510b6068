"""Continuous batching: requests join the running batch at the next step and leave the moment they finish.

Shape legend
    B  rows of the static cache (``max_batch``) or of a decode bucket     R  rows in a prefill
    W  a prefill's width (its longest chunk, others left-padded)     V  vocabulary     H  hidden

Iteration-level scheduling, as vLLM and SGLang do it, on moge's engine pieces. One
:class:`~moge.model.cache.StaticKVCache` of ``max_batch`` rows holds every running request, one
request per row. Each :meth:`Scheduler.step`:

1. handles aborts (a waiting request leaves the queue, a running one frees its row), then admits
   waiting requests first come, first served into free rows (the lowest free row first);
2. prefills: the next chunk of every request still reading its prompt (``prefill_chunk`` tokens in
   all, oldest first), left-padded into one forward through a
   :class:`~moge.model.cache.RowSubsetCache` of their rows (one pass over the weights for all new
   requests, wherever their rows are); a long prompt is read over several steps while the other
   rows keep decoding (chunked prefill, interleaved with decode); a row whose prompt is done samples
   its first token;
3. decodes one token for every decoding row with the fixed-shape :class:`~moge.engine.step.DecodeStep`
   over the leading rows, rounded up to a batch bucket (:func:`~moge.engine.graphs.batch_bucket`):
   rows not decoding (free, still prefilling) ride along with a pad token and their stored length
   is restored from the host's count before every call, so their one written slot is overwritten by
   their next real token before any query can read it; on CUDA each bucket's step is one CUDA graph
   (:class:`~moge.engine.graphs.GraphedStep`), captured when the scheduler is built, and with
   ``compile=True`` (the fast CPU path) each bucket's step is compiled when the scheduler is built;
4. samples with each row's own settings (:func:`~moge.engine.sampling.sample_rows`: per-row
   temperature / top-k / top-p tensors, a generator per seeded request), checks stop conditions
   (max_tokens, EOS, stop token ids, stop strings) and frees finished rows.

The model never sees the scheduler: a row's tokens depend only on that row (attention is per row,
routing per token), so a request's greedy output is what :func:`moge.generate.generate` gives for its
prompt alone, whenever it arrived and whatever else runs. Every outcome reaches the request through
its ``on_event`` callback, called on the thread that runs :meth:`step`; an exception inside one
request's work (its prefill, its callback) fails that request alone (a batched prefill that fails
is retried row by row to find it).

With ``speculative`` (or ``draft_tokens``) the model's MTP predictors draft D tokens per row and a
step verifies 1 + D per decoding row (:mod:`~moge.engine.drafting`); a row's output is unchanged.

Prefix reuse (sharing the cache of a common prompt prefix) is not here: rows own contiguous slots.
It needs a paged cache (fixed-size blocks plus a per-row block table that attention gathers through)
and a hash of full blocks to find shared ones; see docs/serving.md.
"""

from __future__ import annotations

import collections
import itertools
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..model.cache import RowSubsetCache, StaticKVCache
from ..progress import progress
from .drafting import RowDrafter, RowSampling
from .graphs import GraphCaptureError, GraphedStep, batch_bucket
from .request import AdmissionError, Event, QueueFullError, Request, SamplingParams
from .sampling import sample_rows
from .step import DecodeStep, attended_slots, lm_head, prefill

__all__ = ["Scheduler"]


def _top(logprobs_V: Tensor, n: int) -> dict[int, float]:
    if n <= 0:
        return {}
    vals, idx = logprobs_V.topk(min(n, logprobs_V.shape[-1]))
    return dict(zip(idx.tolist(), vals.tolist()))


class Scheduler:
    """Continuous batching of requests over one model (see the module docstring).

    ``max_model_len``: the most positions (prompt + new tokens) a request may use, the cache's
    capacity per row (default: the model's ``max_position_embeddings``). ``decode``: ids -> text,
    needed for stop strings. :meth:`submit` and :meth:`abort` may be called from any thread;
    :meth:`step` from one thread only (the owner of the model). ``compile=True`` (CPU) decodes through
    compiled steps (:class:`~moge.engine.step.DecodeStep` with ``compile=True``), one per batch bucket,
    all compiled here (a progress line per bucket unless ``show_progress=False``); a compiled step
    attends every slot of ``max_model_len``, so a smaller ``max_model_len`` means less attention work.
    """

    def __init__(self, model: nn.Module, max_batch: int = 16, max_model_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int = 512, eos_token_ids: Sequence[int] = (),
                 pad_token_id: int = 0, decode: Callable[[list[int]], str] | None = None,
                 cuda_graphs: bool | None = None, speculative: bool = False, draft_tokens: int | None = None,
                 compile: bool = False, show_progress: bool = True):
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        max_model_len = max_model_len or limit
        for name, v in (("max_batch", max_batch), ("max_model_len", max_model_len), ("max_queue", max_queue),
                        ("prefill_chunk", prefill_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AdmissionError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(limit, int) and max_model_len > limit:
            raise AdmissionError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
        self.model, self.max_batch, self.max_model_len = model.eval(), max_batch, max_model_len
        self.max_queue, self.prefill_chunk, self.decode = max_queue, prefill_chunk, decode
        self.vocab_size = cfg.vocab_size
        self.eos = frozenset(eos_token_ids)
        self.pad = pad_token_id
        if compile and (speculative or draft_tokens):
            raise AdmissionError("compile=True compiles the one-token decode step; speculative decoding verifies "
                                 "a varying number of drafts per row and runs eagerly: use one or the other")
        self.compile = compile
        # Speculative: the MTP predictors draft, each step verifies 1 + D tokens per row (.drafting).
        self._drafter = RowDrafter(model, max_batch, draft_tokens) if speculative or draft_tokens else None
        self.cache = (StaticKVCache.for_model(model, max_batch, max_model_len) if self._drafter is None
                      else self._drafter.new_cache(max_batch, max_model_len))
        self.device = self.cache.lengths_B.device
        self._steps: dict[int, DecodeStep] = {}
        self._graphs: dict[int, GraphedStep] = {}
        self._head = lm_head(model)
        self._rows: list[Request | None] = [None] * max_batch
        self._len = [0] * max_batch  # each row's stored positions, kept on the host
        self._temp_B = torch.zeros(max_batch, device=self.device)
        self._topp_B = torch.ones(max_batch, device=self.device)
        self._topk_B = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._waiting: collections.deque[Request] = collections.deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        if self._drafter is None and (cuda_graphs if cuda_graphs is not None else self.device.type == "cuda"):
            self._capture_graphs()  # speculative steps run eagerly (their gathers vary per step)
        elif compile:
            self._compile_steps(show_progress)

    def _buckets(self) -> list[int]:
        return sorted({min(batch_bucket(n), self.max_batch) for n in range(1, self.max_batch + 1)})

    def _compile_steps(self, show: bool) -> None:
        """Compile the decode step of every batch bucket now (tens of seconds each for the ``small``
        preset on 2 cores), so that no request waits for a compile. Like a CUDA graph capture, a first
        call writes a slot of every row in its bucket: harmless only before any request holds a row,
        and the lengths it advanced are reset."""
        buckets = self._buckets()
        bar = progress(len(buckets), "compile decode steps", "bucket", disable=not show)
        for b in buckets:
            self._step(b)(torch.full((b, 1), self.pad, dtype=torch.long, device=self.device))
            self.cache.lengths_B.zero_()
            bar.update(1)
        bar.close()

    def _capture_graphs(self) -> None:
        """One CUDA graph of the decode step per batch bucket, captured now: a capture writes a few slots
        of every row in its bucket, harmless only before any request holds a row."""
        if self.device.type != "cuda":
            raise AdmissionError(f"cuda_graphs needs the model on a CUDA device, it is on {self.device}")
        for b in self._buckets():
            try:
                self._graphs[b] = GraphedStep(self._step(b))
            except GraphCaptureError as e:
                warnings.warn(f"{e}; the scheduler decodes without CUDA graphs", stacklevel=3)
                self._graphs.clear()
                return

    # ---- thread-safe surface --------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`AdmissionError` unless the request fits: a non-empty prompt of ids in the
        vocabulary and ``len(prompt) + max_tokens <= max_model_len``."""
        if not prompt_ids:
            raise AdmissionError("the prompt is empty: give at least one token")
        bad = [i for i in prompt_ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise AdmissionError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if params.max_tokens < 1:
            raise AdmissionError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise AdmissionError(f"this model's context is {self.max_model_len} tokens; the prompt has "
                                 f"{len(prompt_ids)} and max_tokens is {params.max_tokens}")
        if params.stop and self.decode is None:
            raise AdmissionError("stop strings need a tokenizer (the scheduler has no decode function)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None],
               request_id: str | None = None) -> Request:
        """Queue a request (checked first: :meth:`check`); raises :class:`QueueFullError` when the queue is full."""
        prompt_ids = list(prompt_ids)
        self.check(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", prompt_ids, params, on_event)
        if params.seed is not None and params.temperature > 0:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue holds {self.max_queue} waiting requests; retry later")
            self._waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request at the start of the next step (it hears ``finish_reason="abort"``)."""
        with self._lock:
            self._aborts.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Rows in use (prefilling or decoding): the KV rows held."""
        return sum(r is not None for r in self._rows)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_running > 0 or bool(self._aborts)

    # ---- the step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: aborts, admission, a prefill chunk, one decode step for the decoding rows."""
        self._handle_aborts()
        self._admit()
        self._prefill_some()
        decoding = [r for r in self._rows if r is not None and r.prefilled == len(r.prompt_ids) and not r.finished]
        if decoding:
            self._decode(decoding)

    def _handle_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if aborts:
                kept = [r for r in self._waiting if r.id not in aborts]
                gone = [r for r in self._waiting if r.id in aborts]
                self._waiting = collections.deque(kept)
            else:
                gone = []
        for req in gone:
            self._finish(req, Event(finish_reason="abort"))
        for req in self._rows:
            if req is not None and req.id in aborts:
                self._finish(req, Event(finish_reason="abort"))

    def _admit(self) -> None:
        for row, held in enumerate(self._rows):
            if held is not None:
                continue
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            req.row, self._rows[row], self._len[row] = row, req, 0
            p = req.params
            self._temp_B[row], self._topp_B[row], self._topk_B[row] = p.temperature, p.top_p, p.top_k

    def _prefill_some(self) -> None:
        """The next chunk of every row still reading its prompt (oldest first, ``prefill_chunk`` tokens
        in all), in one forward; a failure there fails those requests and no other."""
        budget, chunks = self.prefill_chunk, []
        for req in sorted((r for r in self._rows if r is not None and r.prefilled < len(r.prompt_ids)),
                          key=lambda r: r.arrival):
            if budget <= 0:
                break
            n = min(budget, len(req.prompt_ids) - req.prefilled)
            budget -= n
            chunks.append((req, n))
        if not chunks:
            return
        try:
            self._prefill_chunks(chunks)
        except Exception as e:
            if len(chunks) == 1:  # this request's failure is its own
                self._finish(chunks[0][0], Event(finish_reason="error", error=f"prefill failed: {e}"))
                return
            for chunk in chunks:  # find which one failed: each alone (they rewrite the same slots)
                self._prefill_some_alone(chunk)

    def _prefill_some_alone(self, chunk: tuple[Request, int]) -> None:
        try:
            self._prefill_chunks([chunk])
        except Exception as e:
            self._finish(chunk[0], Event(finish_reason="error", error=f"prefill failed: {e}"))

    def _prefill_chunks(self, chunks: list[tuple[Request, int]]) -> None:
        """Left-pad the chunks into ``[R, W]`` and prefill them through a :class:`RowSubsetCache` of their rows."""
        width = max(n for _, n in chunks)
        ids_RW = torch.full((len(chunks), width), self.pad, dtype=torch.long)
        mask_RW = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, (req, n) in enumerate(chunks):
            ids_RW[i, width - n:] = torch.tensor(req.prompt_ids[req.prefilled:req.prefilled + n])
            mask_RW[i, width - n:] = 1
        rows_R = torch.tensor([req.row for req, _ in chunks], device=self.device)
        self.cache.lengths_B[rows_R] = torch.tensor([req.prefilled for req, _ in chunks], device=self.device)
        end = max(req.prefilled + n for req, n in chunks)
        view = RowSubsetCache(self.cache, rows_R, attended_slots(end, self.max_model_len))
        logits_R1V, h_RWH = prefill(self.model, view, ids_RW.to(self.device), mask_RW.to(self.device),
                                    kv_len=view.attend)
        starts, firsts = [req.prefilled for req, _ in chunks], {}
        for i, (req, n) in enumerate(chunks):
            start = req.prefilled
            req.prefilled = self._len[req.row] = start + n
            if req.params.prompt_logprobs is not None:
                self._prompt_logprobs(req, start, self._head(h_RWH[i, width - n:]))
            if req.prefilled == len(req.prompt_ids):
                row = req.row
                last_1V = logits_R1V[i, -1:]
                tok_1 = sample_rows(last_1V, self._temp_B[row:row + 1], self._topk_B[row:row + 1],
                                    self._topp_B[row:row + 1], [req.generator])
                firsts[i] = int(tok_1[0])
                self._emit_token(req, firsts[i], last_1V[0])
        if self._drafter is None:
            return
        try:  # the prompts are counted as read: a failure here fails these requests, no retry
            self._drafter.after_prefill(view, chunks, starts, firsts, mask_RW, h_RWH,
                                        (self._temp_B, self._topk_B, self._topp_B))
        except Exception as e:
            for req, _ in chunks:
                self._finish(req, Event(finish_reason="error", error=f"drafting failed: {e}"))

    def _prompt_logprobs(self, req: Request, start: int, logits_SV: Tensor) -> None:
        """Log-probabilities of prompt tokens ``start+1 ..`` from this chunk's logits (the first prompt
        token has none: nothing precedes it)."""
        if start == 0:
            req._prompt_lp.append(None)
        lp_SV = torch.log_softmax(logits_SV.float(), -1)
        nxt = req.prompt_ids[start + 1:start + 1 + lp_SV.shape[0]]
        for i, tok in enumerate(nxt):
            req._prompt_lp.append((float(lp_SV[i, tok]), _top(lp_SV[i], req.params.prompt_logprobs)))

    def _step(self, b: int) -> DecodeStep:
        """The fixed-shape decode step over the leading ``b`` rows (views of the one cache)."""
        if b not in self._steps:
            self._steps[b] = DecodeStep(self.model, self.cache.rows(0, b), compile=self.compile)
        return self._steps[b]

    def _decode(self, decoding: list[Request]) -> None:
        b = min(batch_bucket(max(r.row for r in decoding) + 1), self.max_batch)
        if self._drafter is not None:
            return self._decode_speculative(decoding, b)
        ids_B1 = torch.full((b, 1), self.pad, dtype=torch.long)
        for r in decoding:
            ids_B1[r.row, 0] = r.output_ids[-1]
        self.cache.lengths_B[:b].copy_(torch.tensor(self._len[:b]))
        kv_len = attended_slots(max(self._len[r.row] for r in decoding) + 1, self.max_model_len)
        try:
            if b in self._graphs:  # the full cache length, replayed
                logits_BV = self._graphs[b](ids_B1.to(self.device))[0][:, -1]
            else:
                logits_BV = self._step(b)(ids_B1.to(self.device), kv_len=kv_len)[0][:, -1]
            tokens = sample_rows(logits_BV, self._temp_B[:b], self._topk_B[:b], self._topp_B[:b],
                                 [None if q is None else q.generator for q in self._rows[:b]]).tolist()
        except Exception as e:  # a batch-wide failure fails the rows in it, not the scheduler
            for r in decoding:
                self._finish(r, Event(finish_reason="error", error=f"decode step failed: {e}"))
            return
        for r in decoding:
            self._len[r.row] += 1
            self._emit_token(r, tokens[r.row], logits_BV[r.row])

    def _decode_speculative(self, decoding: list[Request], b: int) -> None:
        """One verify step for the decoding rows: each emits its kept drafts and one more token (up to
        where it finishes) and keeps their positions; the rejected drafts' positions are dropped by
        not counting them."""
        last_b = [self.pad] * b
        for r in decoding:
            last_b[r.row] = r.output_ids[-1]
        newest = max(self._len[r.row] for r in decoding)
        kv_len = attended_slots(newest + self._drafter.window, self.cache.capacity)
        sampling = RowSampling(self._temp_B[:b], self._topk_B[:b], self._topp_B[:b],
                               [None if q is None else q.generator for q in self._rows[:b]],
                               [r.row for r in decoding if r.params.temperature > 0])
        try:
            logits_bSV, n_b, z_bS = self._drafter.decode(self.cache, last_b, self._len[:b], kv_len, sampling)
        except Exception as e:  # a batch-wide failure fails the rows in it, not the scheduler
            for r in decoding:
                self._finish(r, Event(finish_reason="error", error=f"decode step failed: {e}"))
            return
        for r in decoding:
            n = n_b[r.row]
            self._len[r.row] += n + 1  # c and the n kept drafts are stored; a finish resets the row
            for i in range(n + 1):
                self._emit_token(r, z_bS[r.row][i], logits_bSV[r.row, i])
                if r.finished:
                    break

    def _emit_token(self, req: Request, tok: int, logits_V: Tensor) -> None:
        req.output_ids.append(tok)
        p = req.params
        ev = Event(token=tok)
        if p.logprobs is not None:
            lp_V = torch.log_softmax(logits_V.float(), -1)
            ev.logprob, ev.top_logprobs = float(lp_V[tok]), _top(lp_V, p.logprobs)
        if len(req.output_ids) == 1 and p.prompt_logprobs is not None:
            ev.prompt_logprobs, req._prompt_lp = req._prompt_lp, []
        try:
            ev.finish_reason = self._stop_reason(req, tok)
        except Exception as e:
            ev.finish_reason, ev.error = "error", f"stop check failed: {e}"
        if ev.finish_reason is not None:
            self._finish(req, ev)
        else:
            self._send(req, ev)

    def _stop_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        # A stop string ends in the newest tokens: decode only a tail that surely holds it (a token is at
        # least one byte, a character at most four), so a long answer costs O(n), not O(n^2).
        if p.stop and any(s in self.decode(req.output_ids[-(4 * max(map(len, p.stop)) + 8):]) for s in p.stop):
            return "stop"
        return "length" if len(req.output_ids) >= p.max_tokens else None

    def _send(self, req: Request, ev: Event) -> None:
        try:
            req.on_event(ev)
        except Exception:  # a broken listener ends its own request only
            if not req.finished:
                self._release(req)

    def _finish(self, req: Request, ev: Event) -> None:
        if req.finished:
            return
        self._release(req)
        self._send(req, ev)

    def _release(self, req: Request) -> None:
        req.finished = True
        if req.row is not None and self._rows[req.row] is req:
            self._rows[req.row], self._len[req.row] = None, 0
            self._temp_B[req.row], self._topp_B[req.row], self._topk_B[req.row] = 0.0, 1.0, 0
        req.generator = None

    # ---- library use ------------------------------------------------------------------------------

    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[list[int]]:
        """Submit every prompt now and step until all finish; the new tokens of each (tests, benchmarks)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.submit(p, sp, lambda ev: None) for p, sp in zip(prompts, plist)]
        while self.has_work():
            self.step()
        return [r.output_ids for r in reqs]
