"""A request's side of a generation: ``Job`` carries its chunks from the scheduler's thread to
the request's handler on the event loop, and its cancellation back (``scheduler.py`` runs them).

The scheduler's thread pushes every StreamChunk into the job's asyncio queue; the handler reads
them there. A request that goes away (client disconnect, shutdown) sets its job's cancel flag: a
waiting job is dropped, a running one leaves the batch at the next step. A job records why it was
cancelled (``reason``), so the request can answer a shutdown with 503 rather than as a vanished
client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..params import StreamChunk

__all__ = ["CLIENT_GONE", "SHUTDOWN", "Job", "QueueFull"]

_END = object()
CLIENT_GONE = "client"  # cancel reasons
SHUTDOWN = "shutdown"


class QueueFull(RuntimeError):
    """Too many requests are already waiting."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Job:
    """One request's chunks, read with ``async for`` (or ``next``) on the event loop ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.reason: str | None = None  # why it was cancelled: CLIENT_GONE or SHUTDOWN
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
