"""What the async drivers need of asyncio, beside the code they share with the sync ones.

``scripts/unasync.py`` turns ``_async/`` into ``_sync/`` but leaves this module alone:
``_sync/_io.py`` is its hand-written blocking counterpart, name for name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Lock", "promptly"]

Lock = asyncio.Lock

T = TypeVar("T")

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
