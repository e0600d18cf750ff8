"""What the async drivers need of asyncio, beside the code they share with the sync ones.

``scripts/unasync.py`` turns ``_async/`` into ``_sync/`` but leaves this module alone:
``_sync/_io.py`` is its hand-written blocking counterpart, name for name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Batcher", "Lock", "promptly"]

Lock = asyncio.Lock

T = TypeVar("T")
R = TypeVar("R")

# Statements whose caller stopped waiting, left to finish in the background (see promptly).
_abandoned: set[asyncio.Task[Any]] = set()


async def promptly(call: Coroutine[Any, Any, T]) -> T:
    """Await ``call`` in a task of its own, so that a caller who stops waiting (a store timeout,
    a client gone) is let go at once.

    Cancelled mid-statement, psycopg first has the server cancel the statement and waits for
    that: up to 10 s against a server that does not answer, far past any store timeout. That
    now goes on in the background, and the connection returns to the pool (or is dropped) when
    it ends.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        _abandoned.add(task)
        task.add_done_callback(_forget)
        raise


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # no one awaits it: mark its error as seen


class Batcher(Generic[T, R]):
    """Natural batching: while ``lanes`` round trips are out, operations that arrive queue up,
    and when one returns, the queue (up to ``max_size``) goes out together in the next.

    ``send`` takes the queued items and returns one result per item, in order: a value, or an
    exception instance for an item that failed on its own. When ``send`` raises, every item of
    that round trip gets the error. At low load nothing waits: an item that finds a free lane
    goes out on the next turn of the event loop, with whatever else arrived in that turn.

    A caller that stops waiting (a timeout, a cancelled request) is let go at once: its item is
    taken out of the queue when it has not been sent, and its result dropped when it has. A round
    trip runs in a task of its own, so no caller's cancellation cuts it short for the others.
    """

    def __init__(
        self,
        send: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_size: int = 64,
        lanes: int = 1,
    ) -> None:
        if max_size < 1 or lanes < 1:
            raise ValueError(f"max_size and lanes must be at least 1, not {max_size}, {lanes}")
        self._send = send
        self.max_size = max_size
        self.lanes = lanes
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Send ``item`` in the next round trip and return its result (or raise its error)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = (item, future)
        self._queue.append(entry)
        if self._running < self.lanes:
            self._running += 1
            task = asyncio.ensure_future(self._lane())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            return await future
        except asyncio.CancelledError:
            # Not sent yet: taken out. Sent already: its result, when it comes, is dropped.
            with contextlib.suppress(ValueError):
                self._queue.remove(entry)
            raise

    async def _lane(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[T, asyncio.Future[R]]] = []
                while self._queue and len(batch) < self.max_size:
                    entry = self._queue.popleft()
                    if not entry[1].done():
                        batch.append(entry)
                if batch:
                    await self._round_trip(batch)
        finally:
            self._running -= 1

    async def _round_trip(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation of the lane itself (the loop is closing)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
