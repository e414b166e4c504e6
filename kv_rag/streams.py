"""The callers' side of a served request: :class:`Stream` and :class:`AsyncStream` and the sinks that feed them.

The scheduler (:mod:`kv_rag.serving`) runs requests in its own thread and reports each one's text
pieces, result or error to the request's :class:`Sink`: a thread-safe queue for :class:`Stream`,
the caller's event loop for :class:`AsyncStream` (no thread waits per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from .results import Generation


class Request(Protocol):
    """A submitted request as its stream sees it (the scheduler's :class:`~kv_rag.serving.Job`)."""

    #: set to stop the request at its next step
    cancelled: bool


class Sink(Protocol):
    """Where a request's text pieces, its result or its error go (called from the scheduler's thread)."""

    def piece(self, text: str) -> None:
        """A new text piece."""

    def done(self, result: Generation) -> None:
        """The request finished."""

    def failed(self, exc: BaseException) -> None:
        """The request failed."""


class _QueueSink:
    """Events for a thread that waits on a queue."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def piece(self, text: str) -> None:
        self.q.put(("piece", text))

    def done(self, result: Generation) -> None:
        self.q.put(("done", result))

    def failed(self, exc: BaseException) -> None:
        self.q.put(("failed", exc))


class _LoopSink:
    """Events for a coroutine: put on its event loop's queue from the scheduler's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _put(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)

    def piece(self, text: str) -> None:
        self._put(("piece", text))

    def done(self, result: Generation) -> None:
        self._put(("done", result))

    def failed(self, exc: BaseException) -> None:
        self._put(("failed", exc))


class Stream(Iterator[str]):
    """An iterator of text pieces; after it is exhausted, :attr:`result` holds the :class:`Generation`.

    :meth:`close` (or dropping the stream) stops the request at the next step.
    """

    def __init__(self, submit: Callable[[Sink], Request]) -> None:
        self._sink = _QueueSink()
        self._job = submit(self._sink)
        self.result: Generation | None = None
        self._over = False
        weakref.finalize(self, _cancel, self._job)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if self._over:
            raise StopIteration
        piece = _take(self, *self._sink.q.get())
        if piece is None:
            raise StopIteration
        return piece

    def close(self) -> None:
        """Stop generating early (no result is recorded)."""
        self._job.cancelled = True
        self._over = True


class AsyncStream(AsyncIterator[str]):
    """:class:`Stream` for coroutines: pieces arrive through the event loop, no thread waits per token."""

    def __init__(self, submit: Callable[[Sink], Request]) -> None:
        self._submit = submit
        self._sink: _LoopSink | None = None
        self._job: Request | None = None
        self.result: Generation | None = None
        self._over = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        if self._over:
            raise StopAsyncIteration
        if self._sink is None:  # first step: plan in a worker thread (tokens, keys, look-ups), then submit
            self._sink = _LoopSink(asyncio.get_running_loop())
            self._job = await asyncio.to_thread(self._submit, self._sink)
            weakref.finalize(self, _cancel, self._job)
        piece = _take(self, *(await self._sink.q.get()))
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def aclose(self) -> None:
        """Stop generating early (no result is recorded)."""
        if self._job is not None:
            self._job.cancelled = True
        self._over = True


def _take(stream: Stream | AsyncStream, kind: str, value: Any) -> str | None:
    """A sink event for ``stream``: the piece, or ``None`` at the end (the result recorded); a failure raises."""
    if kind == "piece":
        return str(value)
    stream._over = True
    if kind == "failed":
        raise value
    stream.result = value
    return None


def _cancel(job: Request) -> None:
    job.cancelled = True
