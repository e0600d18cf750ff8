"""An in-process store: a dict and a lock. For tests and single-process toys.

Every operation runs under one lock without awaiting, so it is atomic for the event loop and
for threads alike. Nothing survives the process.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from .._codec import Claimed, Existing, Record, State, StoredResponse
from ._rules import ABANDONED_RETENTION, claim_rule

__all__ = ["MemoryStore"]


class MemoryStore:
    """Records in a dict; ``clock`` is injectable so tests move time without sleeping."""

    # Operations finish without waiting on anything: the driver needs no timer around them.
    # (A subclass whose operations may wait must set this to False.)
    in_process = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> MemoryStore:
        return cls(clock=clock)

    def _owned(self, claim: Claimed) -> Record | None:
        record = self._records.get(claim.key)
        if record is None or record.token != claim.token or record.state is not State.IN_FLIGHT:
            return None
        return record

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        with self._lock:
            result, record = claim_rule(
                self._records.get(key), key, fingerprint, lease=lease, now=self._clock()
            )
            if record is not None:
                self._records[key] = record
            return result

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        with self._lock:
            current = self._records.get(claim.key)
            if (
                current is not None
                and current.token == claim.token
                and current.state is State.COMPLETED
            ):
                return True  # idempotent for its own token: a retry learns it is stored
            record = self._owned(claim)
            if record is None:
                return False
            now = self._clock()
            self._records[claim.key] = dataclasses.replace(
                record,
                state=State.COMPLETED,
                expires_at=now + ttl,
                forget_at=now + ttl + tombstone_ttl,
                response=response,
            )
            return True

    async def release(self, claim: Claimed) -> bool:
        with self._lock:
            record = self._owned(claim)
            if record is None:
                return False
            if record.phases:
                # Keep the recovery points: the next claim takes over and resumes from them.
                now = self._clock()
                self._records[claim.key] = dataclasses.replace(
                    record, lease_until=now, expires_at=now
                )
            else:
                del self._records[claim.key]
            return True

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        with self._lock:
            record = self._owned(claim)
            if record is None:
                return False
            self._records[claim.key] = dataclasses.replace(
                record, phases=(*record.phases, (name, data))
            )
            return True

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        with self._lock:
            record = self._owned(claim)
            if record is None:
                return False
            lease_until = self._clock() + lease
            self._records[claim.key] = dataclasses.replace(
                record,
                lease_until=lease_until,
                expires_at=lease_until,
                forget_at=max(record.forget_at, lease_until + ABANDONED_RETENTION),
            )
            return True

    async def get(self, key: str) -> Record | None:
        with self._lock:
            return self._records.get(key)

    async def purge(self, *, limit: int = 1000) -> int:
        with self._lock:
            now = self._clock()
            expired = [k for k, r in self._records.items() if r.forget_at <= now][:limit]
            for key in expired:
                del self._records[key]
            # Past its replay window a completed record keeps only its fingerprint (a tombstone).
            for key, record in self._records.items():
                if (
                    record.state is State.COMPLETED
                    and record.expires_at <= now
                    and record.response is not None
                ):
                    self._records[key] = dataclasses.replace(record, response=None)
            return len(expired)

    async def aclose(self) -> None:
        return None
