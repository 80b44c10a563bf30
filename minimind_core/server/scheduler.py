"""Continuous batching: one thread runs the engine's token loop for every request at once.

Requests wait in a bounded FIFO (QueueFull past ``max_queue``: a 503). Between two decode steps
the scheduler admits waiting requests while fewer than ``max_num_seqs`` run and the cache has a
slot (their prompts are prefilled in chunks of at most ``max_num_batched_tokens`` per step, so a
long prompt never stalls the running streams), and removes finished or cancelled ones (a client
disconnect frees its row at the next step). Finished rows leave their keys in the cache as
reusable prefixes (``prefix_cache`` slots, LRU), so the next turn of a chat prefills only its new
tokens. The engine is held one step at a time, so library calls on the same engine interleave.
A request's tokens do not depend on the others (the token loop's guarantee): the same alone or
among sixteen, with or without the prefix cache.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine import Row, TokenLoop
from ..outputs import RequestOutput
from ..params import SamplingParams, StreamChunk
from .worker import _END, CLIENT_GONE, SHUTDOWN, Job, QueueFull, _Failure

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["BatchJob", "Scheduler", "SchedulerStats"]
log = logging.getLogger("minimind_core.server")


class BatchJob(Job):
    """A request for the scheduler: prompt ids, sampling, seed; chunks arrive as with ``Job``."""

    def __init__(self, ids: list[int], params: SamplingParams, seed: int | None, budget: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.ids, self.params, self.seed, self.budget = ids, params, seed, budget
        self.row: Row | None = None
        self.output: RequestOutput | None = None
        self.queued = time.perf_counter()
        self.group: list[BatchJob] = [self]  # the n choices of one prompt, admitted together


@dataclass
class SchedulerStats:
    """Counters for /metrics and /health (read from any thread)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose keys came from the prefix cache
    requests_finished: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # seconds
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # between tokens


class Scheduler:
    """Waiting and running requests over one ``TokenLoop`` (see the module docstring).

    Args:
        engine: the loaded model.
        max_num_seqs: requests decoded together.
        max_queue: requests that may wait; more get QueueFull.
        max_num_batched_tokens: prompt tokens prefilled per step (chunked prefill).
        prefix_cache_mb: memory for finished rows kept as reusable prefixes (0 = off): up to
            ``max_num_seqs`` more cache slots, as many as fit at the cache's current length.
        prefix_cache: a fixed number of such slots instead (tests); overrides the MB figure.
        on_token: called with (job, token) for every token drawn (metrics).
    """

    def __init__(self, engine: Engine, *, max_num_seqs: int = 16, max_queue: int = 64,
                 max_num_batched_tokens: int = 512, prefix_cache_mb: float = 512.0,
                 prefix_cache: int | None = None,
                 on_token: Callable[[BatchJob, int], None] | None = None) -> None:
        for name, value, low in (("max_num_seqs", max_num_seqs, 1), ("max_queue", max_queue, 0),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1),
                                 ("prefix_cache", 0 if prefix_cache is None else prefix_cache, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb!r}")
        self.engine, self.max_num_seqs, self.max_queue = engine, max_num_seqs, max_queue
        self.chunk, self.prefix_cache_mb, self.fixed_prefix = (max_num_batched_tokens,
                                                               prefix_cache_mb, prefix_cache)
        self.extra_slots = max_num_seqs if (prefix_cache or (prefix_cache is None
                                                             and prefix_cache_mb > 0)) else 0
        self.on_token = on_token
        self.stats = SchedulerStats()
        self._waiting: deque[BatchJob] = deque()
        self._running: list[BatchJob] = []
        self._cond = threading.Condition()
        self._closed = False
        self._loop: TokenLoop | None = None
        self._thread = threading.Thread(target=self._run, name="minimind-scheduler", daemon=True)
        self._thread.start()

    # ---- what the routes call -------------------------------------------------------------
    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    def submit(self, ids: list[int], params: SamplingParams, seed: int | None = None,
               budget: int | None = None) -> BatchJob:
        """Queue a request (call from the event loop); raises QueueFull when full. ``budget``:
        tokens it may generate (default ``params.max_new_tokens``, clamped to the window)."""
        window = self.engine.config.max_position_embeddings
        budget = min(params.max_new_tokens if budget is None else budget, window - len(ids))
        job = BatchJob(list(ids), params, params.seed if seed is None else seed, max(budget, 0),
                       asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting "
                                f"(the limit is {self.max_queue}); retry shortly")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def submit_n(self, ids: list[int], params: SamplingParams, n: int) -> list[BatchJob]:
        """Queue ``n`` choices of one prompt (``n > 1``): admitted together, the prompt prefilled
        once and its keys forked into the other rows. Choice ``i`` samples with ``seed + i``, so
        choice 0 is what ``n=1`` gives with the same seed. Raises QueueFull, or ValueError when
        ``n`` is more than ``max_num_seqs``."""
        if n == 1:
            return [self.submit(ids, params)]
        if not 1 <= n <= self.max_num_seqs:
            raise ValueError(f"n is {n}, but this server decodes at most {self.max_num_seqs} "
                             "rows together (--max-num-seqs); ask for fewer choices")
        seed = params.seed
        window = self.engine.config.max_position_embeddings
        budget = max(min(params.max_new_tokens, window - len(ids)), 0)
        loop = asyncio.get_running_loop()
        jobs = [BatchJob(list(ids), params, None if seed is None else (seed + i) % 2**64,
                         budget, loop) for i in range(n)]
        for job in jobs:
            job.group = jobs
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + n > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting "
                                f"(the limit is {self.max_queue}); retry shortly")
            self._waiting.extend(jobs)
            self._cond.notify()
        return jobs

    @property
    def closed(self) -> bool:
        """True once ``drain`` or ``close`` was called: no new requests are taken."""
        return self._closed

    def cancel(self, job: Job, reason: str = CLIENT_GONE) -> None:
        """Stop a request: dropped if waiting, its row freed at the next step if running."""
        job.cancel(reason)
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.finished.set()
                job._put(_END)
            self._cond.notify()

    def drain(self) -> list[Job]:
        """Take no more requests and drop every waiting one (reason SHUTDOWN); the running ones
        go on and are returned."""
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in waiting:
            job.cancel(SHUTDOWN)
            job.finished.set()
            job._put(_END)
        return running

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel everything and stop the thread (waits up to ``timeout`` seconds)."""
        for job in self.drain():
            self.cancel(job, SHUTDOWN)
        self._thread.join(timeout)

    # ---- the scheduling thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed and not self._running and not self._waiting:
                    return
            try:
                with self.engine.exclusive():  # one step at a time: library calls interleave
                    self._step()
            except Exception as e:  # reported to the requests; the thread goes on
                log.exception("the scheduler's step failed")
                self._fail_all(e)

    def _token_loop(self) -> TokenLoop:
        loop = self._loop
        if loop is None or (not loop.rows and loop.cache is not self.engine._cache):
            loop = self._loop = TokenLoop(self.engine, self.max_num_seqs + self.extra_slots, 256,
                                          chunk=self.chunk)
        loop.prefix_cache = self._prefix_slots(loop)
        return loop

    def _prefix_slots(self, loop: TokenLoop) -> int:
        """How many finished rows may stay cached: a fixed number, or what the MB budget buys
        at the cache's current length (fewer as the cache grows)."""
        if self.fixed_prefix is not None:
            return min(self.fixed_prefix, loop.cache.slots)
        if not self.extra_slots:
            return 0
        per_slot = loop.cache.nbytes / loop.cache.slots
        if not per_slot:  # a cache with no storage of its own (test engines)
            return self.extra_slots
        return int(min(self.extra_slots, self.prefix_cache_mb * 2**20 // per_slot))

    def _admit(self, loop: TokenLoop) -> None:
        if not self._waiting:  # the common case between two steps: no lock taken
            return
        while True:
            with self._cond:
                if not self._waiting:
                    return
                group = [j for j in self._waiting[0].group if j in self._waiting]
                if len(self._running) + len(group) > self.max_num_seqs:
                    return
                if int((~loop.cache.used).sum()) < len(group):
                    return
                for job in group:
                    self._waiting.remove(job)
                    self._running.append(job)
            live = []
            for job in group:
                if job.cancelled.is_set():
                    self._finish(loop, job, final=False)
                    continue
                job.output = RequestOutput(self.engine.tokenizer, job.params, len(job.ids),
                                           job.budget, started=job.queued)
                if job.budget <= 0:
                    self._finish(loop, job)
                    continue
                live.append(job)
            if live:
                self._start(loop, live)

    def _start(self, loop: TokenLoop, jobs: list[BatchJob]) -> None:
        """Rows for one prompt's live choices: the first added, the others forked from it after
        its prefill (done at once here, so the fork can share it)."""
        lead = jobs[0]
        chunk = loop.chunk
        if len(jobs) > 1:
            loop.chunk = None  # prefill now: ``fork`` needs the prompt's keys in place
        try:
            lead.row = loop.add(lead.ids, lead.params, lead.seed, reserve=lead.budget)
            for job in jobs[1:]:
                job.row = loop.fork(lead.row, job.seed)
        except Exception as e:
            for job in jobs:
                job._put(_Failure(e))
                self._finish(loop, job, final=False)
            return
        finally:
            loop.chunk = chunk
        self.stats.prompt_tokens += len(lead.ids)
        self.stats.cached_prompt_tokens += lead.row.cached_tokens

    def _step(self) -> None:
        loop = self._token_loop()
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._finish(loop, job, final=False)
        self._admit(loop)
        if not loop.rows:
            return
        by_row = {id(j.row): j for j in self._running if j.row is not None}
        for row, token in loop.step():
            job = by_row[id(row)]
            out = job.output
            before = out.last
            chunk = out.add(token, row.logprob)
            self.stats.generation_tokens += 1
            if before:
                self.stats.itl.append(out.last - before)
            else:
                self.stats.ttft.append(out.first - out.started)
            if self.on_token is not None:
                self.on_token(job, token)
            if chunk is None and not out.done:
                # no new text yet (half a character, a possible stop string held back): the
                # client still hears of the token, as vLLM streams it, so the response starts
                # at the first token and a stream's gaps are its real inter-token latency
                chunk = StreamChunk("", token, index=out.index)
            if chunk is not None:
                job._put(chunk)
            if out.done or job.cancelled.is_set():
                self._finish(loop, job)

    def _finish(self, loop: TokenLoop, job: BatchJob, final: bool = True) -> None:
        """Take a request out: its row leaves the loop, its last chunk (and the end) is sent."""
        if job.row is not None and job.row in loop.rows:
            loop.remove(job.row)
        if final and job.output is not None and not job.cancelled.is_set():
            job._put(job.output.final())
            self.stats.requests_finished += 1
        with self._cond:
            if job in self._running:
                self._running.remove(job)
        job.finished.set()
        job._put(_END)

    def _fail_all(self, error: BaseException) -> None:
        """Every running request gets ``error`` (and the waiting ones too when none was
        running: the step that failed was theirs, and would fail again)."""
        loop = self._loop
        with self._cond:
            jobs = list(self._running)
            if not jobs:
                jobs, self._waiting = list(self._waiting), deque()
                self._running.extend(jobs)
        for job in jobs:
            job._put(_Failure(error))
            if loop is not None:
                self._finish(loop, job, final=False)
            else:
                with self._cond:
                    self._running.remove(job)
                job.finished.set()
                job._put(_END)

    def describe(self) -> dict[str, Any]:
        """Settings and counters (for /health and /metrics)."""
        loop = self._loop
        return {"max_num_seqs": self.max_num_seqs, "max_queue": self.max_queue,
                "max_num_batched_tokens": self.chunk, "prefix_cache_mb": self.prefix_cache_mb,
                "prefix_cache_slots": loop.prefix_cache if loop else None,
                "running": self.running, "waiting": self.waiting}
