"""An in-process store: a dict and a lock, running ``stores/_rules.py`` as it is.

For tests and single-process toys. Every operation runs under one lock without waiting on
anything, so it is atomic for threads and for the event loop alike (:class:`AsyncMemoryStore`
calls the same store directly). Nothing survives the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._codec import Claimed, Existing, Record, StoredResponse
from ..events import StoreStats
from . import _rules
from ._over_sync import AsyncOverSync
from ._stats import stats_of

__all__ = ["AsyncMemoryStore", "MemoryStore"]


class MemoryStore:
    """Records in a dict; ``clock`` is injectable so tests move time without sleeping."""

    # Operations finish without waiting on anything: a driver needs no timer around them.
    # (A subclass whose operations may wait must set this to False.)
    in_process = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> MemoryStore:
        return cls(**options)

    def _apply(self, key: str, change: _rules.Change) -> None:
        if change is _rules.DELETE:
            del self._records[key]
        elif change is not _rules.KEEP:
            self._records[key] = change

    def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        with self._lock:
            result, change = _rules.claim_rule(
                self._records.get(key), key, fingerprint, lease=lease, now=self._clock()
            )
            self._apply(key, change)
            return result

    def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        with self._lock:
            done, change = _rules.complete_rule(
                self._records.get(claim.key),
                claim,
                response,
                ttl=ttl,
                tombstone_ttl=tombstone_ttl,
                now=self._clock(),
            )
            self._apply(claim.key, change)
            return done

    def release(self, claim: Claimed) -> bool:
        with self._lock:
            done, change = _rules.release_rule(
                self._records.get(claim.key), claim, now=self._clock()
            )
            self._apply(claim.key, change)
            return done

    def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        with self._lock:
            done, change = _rules.phase_rule(self._records.get(claim.key), claim, name, data)
            self._apply(claim.key, change)
            return done

    def renew(self, claim: Claimed, *, lease: float) -> bool:
        with self._lock:
            done, change = _rules.renew_rule(
                self._records.get(claim.key), claim, lease=lease, now=self._clock()
            )
            self._apply(claim.key, change)
            return done

    def get(self, key: str) -> Record | None:
        with self._lock:
            return self._records.get(key)

    def purge(self, *, limit: int = 1000) -> int:
        with self._lock:
            now = self._clock()
            budget = {"delete": limit, "strip": limit}
            for key, record in list(self._records.items()):
                verdict = _rules.purge_rule(record, now=now)
                if verdict == "keep" or budget[verdict] <= 0:
                    continue
                budget[verdict] -= 1
                if verdict == "delete":
                    del self._records[key]
                else:
                    self._records[key] = _rules.strip(record)
            return limit - budget["delete"]

    def stats(self, *, limit: int = 20) -> StoreStats:
        """Records by state and the ``limit`` oldest leases (one pass over the dict)."""
        with self._lock:
            return stats_of(list(self._records.values()), now=self._clock(), limit=limit)

    def close(self) -> None:
        return None


class AsyncMemoryStore(AsyncOverSync[MemoryStore]):
    """The async side of :class:`MemoryStore` (the same operations, never waiting)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(MemoryStore(clock=clock))

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> AsyncMemoryStore:
        return cls(**options)
