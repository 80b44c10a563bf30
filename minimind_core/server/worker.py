"""Run generations off the event loop: one worker thread, a bounded queue, cancellation.

The Engine generates one request at a time (it holds a lock for the whole generation), so the
server hands each request to a single worker thread in arrival order. The thread pushes every
StreamChunk into the request's asyncio queue; the request's handler reads them there. A request
that goes away (client disconnect, shutdown) sets its job's cancel flag: a waiting job is
dropped, a running one stops at its next chunk — the worker closes the engine's generator, which
releases the engine for the next request. A job records why it was cancelled (``reason``), so
the request can answer a shutdown with 503 rather than as a vanished client.

On shutdown ``drain`` stops taking jobs and drops the waiting ones at once (their requests answer
503); the running one may finish until a deadline, then it is cancelled too.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..params import StreamChunk

__all__ = ["CLIENT_GONE", "SHUTDOWN", "GenerationWorker", "Job", "QueueFull"]

_END = object()
CLIENT_GONE = "client"  # cancel reasons
SHUTDOWN = "shutdown"


class QueueFull(RuntimeError):
    """Too many requests are already waiting."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Job:
    """One generation: ``start()`` makes the chunk iterator; read results with ``async for``."""

    def __init__(self, start: Callable[[], Iterator[StreamChunk]],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.start = start
        self.loop = loop
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.reason: str | None = None  # why it was cancelled: CLIENT_GONE or SHUTDOWN
        self.chunks_made = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def cancel(self, reason: str = CLIENT_GONE) -> None:
        """Ask the worker to stop (or never start) this job; safe from any thread. The first
        reason given is kept."""
        if self.reason is None:
            self.reason = reason
        self.cancelled.set()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is reading
            self.cancelled.set()

    def run(self) -> None:
        """Generate in the calling (worker) thread until done or cancelled."""
        gen: Iterator[StreamChunk] | None = None
        try:
            if self.cancelled.is_set():
                return
            gen = self.start()
            for chunk in gen:
                self.chunks_made += 1
                self._put(chunk)
                if self.cancelled.is_set():
                    break
        except Exception as e:  # reported to the request, never kills the worker
            self._put(_Failure(e))
        finally:
            if gen is not None and hasattr(gen, "close"):
                try:
                    gen.close()  # runs the engine's cleanup and releases its lock
                except Exception:  # noqa: S110 - cleanup must not mask the result
                    pass
            self.finished.set()
            self._put(_END)

    async def next(self) -> StreamChunk | None:
        """The next chunk, None once the job has ended (done or cancelled); re-raises the
        generation's exception."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls see the end too
            return None
        if isinstance(item, _Failure):
            raise item.error
        return item

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        while (chunk := await self.next()) is not None:
            yield chunk


class GenerationWorker:
    """A single generation thread fed by a bounded FIFO of jobs.

    Args:
        max_queue: how many requests may wait while one generates; more get QueueFull (503).
    """

    def __init__(self, max_queue: int = 64) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self.running: Job | None = None
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="minimind-generate",
                                        daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def submit(self, start: Callable[[], Iterator[StreamChunk]]) -> Job:
        """Queue a generation (call from the event loop); raises QueueFull when full."""
        job = Job(start, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting "
                                f"(the limit is {self.max_queue}); retry shortly")
            self._waiting.append(job)
            self._cond.notify()
        return job

    @property
    def closed(self) -> bool:
        """True once ``drain`` or ``close`` was called: no new jobs are taken."""
        return self._closed

    def cancel(self, job: Job, reason: str = CLIENT_GONE) -> None:
        """Stop a job: dropped if still waiting, stopped at its next chunk if running."""
        job.cancel(reason)
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.finished.set()
                job._put(_END)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self.running = self._waiting.popleft()
            try:
                job.run()
            finally:
                with self._cond:
                    self.running = None

    def drain(self) -> Job | None:
        """Take no more jobs and drop every waiting one (reason SHUTDOWN); the running job, if
        any, goes on and is returned."""
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()  # under the lock, so the worker cannot start one of them
            running = self.running
            self._cond.notify_all()
        for job in waiting:
            job.cancel(SHUTDOWN)
            job.finished.set()
            job._put(_END)
        return running

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel everything and stop the thread (waits up to ``timeout`` seconds)."""
        running = self.drain()
        if running is not None:
            self.cancel(running, SHUTDOWN)
        self._thread.join(timeout)
