"""The blocking counterparts of ``_async/_io.py``, name for name, for the generated drivers.

Threads need no help where asyncio does: a statement is never abandoned half-way by a caller
that stopped waiting (``promptly`` is the call itself).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher", "Lock", "promptly"]

T = TypeVar("T")
R = TypeVar("R")

Lock = threading.Lock


def promptly(result: T) -> T:
    """A blocking call has already finished when it gets here."""
    return result


class Batcher(Generic[T, R]):
    """The blocking side of ``_async/_io.py``'s batcher: each item is its own round trip.

    A thread that calls a store waits for its own answer; there is no event loop turn in which
    others' operations could join it, so nothing is queued.
    """

    def __init__(
        self,
        send: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_size: int = 64,
        lanes: int = 1,
    ) -> None:
        if max_size < 1 or lanes < 1:
            raise ValueError(f"max_size and lanes must be at least 1, not {max_size}, {lanes}")
        self._send = send
        self.max_size = max_size
        self.lanes = lanes

    def submit(self, item: T) -> R:
        """Send ``item`` alone and return its result (or raise its error)."""
        (result,) = self._send([item])
        if isinstance(result, BaseException):
            raise result
        return result
