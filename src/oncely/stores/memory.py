"""An in-process store: a dict and a lock, running ``stores/_rules.py`` as it is.

For tests and single-process toys. Every operation runs under one lock without waiting on
anything, so it is atomic for threads and for the event loop alike (:class:`AsyncMemoryStore`
calls the same store directly). Nothing survives the process.

Memory is bounded: at most ``max_records`` records (default 100,000; ``memory:?max_records=N``
or the constructor). A claim of a new key when the store is full first drops forgotten records
(past ``forget_at``), then completed records, oldest expiry first, then abandoned in-flight
records (lease long expired), a twentieth of the cap at a time. It never evicts an in-flight
record whose lease is live: that would let a duplicate of a running request run a second time.
When only live leases remain, the claim is refused with :class:`~oncely.StoreUnavailable` (a 503
to the client) and a warning is logged on the ``oncely`` logger; ``evicted`` and ``refused``
count what happened.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .._codec import Claimed, Existing, Record, State, StoredResponse
from .._errors import ConfigurationError, StoreUnavailable
from ..events import StoreStats
from . import _rules
from ._over_sync import AsyncOverSync
from ._stats import stats_of

__all__ = ["DEFAULT_MAX_RECORDS", "AsyncMemoryStore", "MemoryStore"]

log = logging.getLogger("oncely")

#: Records a :class:`MemoryStore` holds at most unless told otherwise.
DEFAULT_MAX_RECORDS = 100_000


def _max_records_of(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``max_records`` from the URL's query (``memory:?max_records=N``)."""
    query = urlsplit(url).query or (url.split("?", 1)[1] if "?" in url else "")
    values = parse_qs(query).get("max_records")
    if values and "max_records" not in options:
        try:
            options = {**options, "max_records": int(values[-1])}
        except ValueError:
            raise ConfigurationError(f"max_records in {url!r} is not a whole number") from None
    return options


class MemoryStore:
    """Records in a dict; ``clock`` is injectable so tests move time without sleeping."""

    # Operations finish without waiting on anything: a driver needs no timer around them.
    # (A subclass whose operations may wait must set this to False.)
    in_process = True

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_records: int = DEFAULT_MAX_RECORDS
    ) -> None:
        if max_records < 1:
            raise ConfigurationError(f"max_records must be at least 1, not {max_records}")
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self.max_records = max_records
        self.evicted = 0  # records dropped to make room
        self.refused = 0  # claims refused because only live leases were left

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> MemoryStore:
        return cls(**_max_records_of(url, options))

    def __len__(self) -> int:
        return len(self._records)

    def _make_room(self, now: float) -> None:
        """Room for one more record, or :class:`StoreUnavailable` (caller holds the lock)."""
        records = self._records
        if len(records) < self.max_records:
            return
        for key in [k for k, r in records.items() if r.forget_at <= now]:
            del records[key]
            self.evicted += 1
        # Free a twentieth of the cap at once, so a flood pays for one pass every so often.
        need = len(records) - self.max_records + 1 + self.max_records // 20
        if need > 0:
            completed = (
                (r.expires_at, k) for k, r in records.items() if r.state is State.COMPLETED
            )
            victims = heapq.nsmallest(need, completed)
            if len(victims) < need:
                abandoned = (
                    (r.lease_until, k)
                    for k, r in records.items()
                    if r.state is State.IN_FLIGHT and r.lease_until <= now
                )
                victims += heapq.nsmallest(need - len(victims), abandoned)
            for _, key in victims:
                del records[key]
            self.evicted += len(victims)
        if len(records) >= self.max_records:
            self.refused += 1
            log.warning(
                "memory store full: %d records, all in flight with a live lease; claim refused",
                len(records),
            )
            raise StoreUnavailable(
                f"the memory store is full ({self.max_records} records in flight); "
                "raise max_records or use a shared store"
            )

    def _apply(self, key: str, change: _rules.Change) -> None:
        if change is _rules.DELETE:
            del self._records[key]
        elif change is not _rules.KEEP:
            self._records[key] = change

    def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        with self._lock:
            now = self._clock()
            old = self._records.get(key)
            if old is None and len(self._records) >= self.max_records:
                self._make_room(now)
            result, change = _rules.claim_rule(old, key, fingerprint, lease=lease, now=now)
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

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_records: int = DEFAULT_MAX_RECORDS
    ) -> None:
        super().__init__(MemoryStore(clock=clock, max_records=max_records))

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> AsyncMemoryStore:
        return cls(**_max_records_of(url, options))

    # The operations of a request, each a direct call of the sync store's (no ``_call`` in
    # between: one coroutine per operation, not two).

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        return self.sync.claim(key, fingerprint, lease=lease)

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        return self.sync.complete(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)

    async def release(self, claim: Claimed) -> bool:
        return self.sync.release(claim)
