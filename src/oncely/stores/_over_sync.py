"""The async side of a store whose backend lives in the process (memory, SQLite).

Such a store's sync side is its implementation; the async side runs each of its operations,
directly (memory: a dict under a lock never waits) or on a worker thread (SQLite: a file lock may
wait, and the event loop must not). :class:`AsyncOverSync` writes that once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from .._codec import Claimed, Existing, Record, StoredResponse
from ..events import Inspectable, StoreStats
from . import Store

__all__ = ["AsyncOverSync"]

S = TypeVar("S", bound=Store)
T = TypeVar("T")


class AsyncOverSync(Generic[S]):
    """Every :class:`oncely.AsyncStore` operation as a call of ``self.sync``'s."""

    in_process = True

    def __init__(self, sync: S) -> None:
        self.sync = sync

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run one operation of the sync store (here directly; subclasses may use a thread)."""
        return fn(*args, **kwargs)

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        return await self._call(self.sync.claim, key, fingerprint, lease=lease)

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        return await self._call(
            self.sync.complete, claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl
        )

    async def release(self, claim: Claimed) -> bool:
        return await self._call(self.sync.release, claim)

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        return await self._call(self.sync.record_phase, claim, name, data)

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        return await self._call(self.sync.renew, claim, lease=lease)

    async def get(self, key: str) -> Record | None:
        return await self._call(self.sync.get, key)

    async def purge(self, *, limit: int = 1000) -> int:
        return await self._call(self.sync.purge, limit=limit)

    async def stats(self, *, limit: int = 20) -> StoreStats:
        """See :class:`oncely.events.Inspectable` (the sync store's ``stats``)."""
        return await self._call(cast(Inspectable, self.sync).stats, limit=limit)

    async def aclose(self) -> None:
        await self._call(self.sync.close)
