"""What a store holds, counted: the rule every store's ``stats`` follows, written once.

A record is, at the store's clock ``now``, exactly one of:

    expired      past forget_at, waiting for purge (any state)
    in flight    claimed, not completed (its lease may have ended: a retry will take it over)
    completed    completed, its response still replayable (before expires_at)
    tombstone    completed, past expires_at: only its fingerprint is kept, until forget_at

The memory store runs :func:`stats_of` on its records; SQLite and PostgreSQL count in one SQL
statement, Redis with a SCAN of its prefix. In-flight keys are listed by their storage key's
keyed hash (:func:`oncely._keys.key_hash`, the one decisions and logs carry), never the
storage key itself, the oldest lease first.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from .._codec import Record, State
from .._keys import key_hash
from ..events import InFlightKey, StoreStats
from ._rules import claimed_at

__all__ = ["StatsCounter", "in_flight_key", "key_hash", "stats_of"]


class StatsCounter:
    """Counts records one at a time; keeps only the ``limit`` oldest leases (bounded memory)."""

    def __init__(self, now: float, limit: int) -> None:
        self.now, self.limit = now, max(0, limit)
        self.in_flight = self.completed = self.tombstones = self.expired = 0
        self.oldest: float | None = None
        # A max-heap on lease_until, negated: (-lease_until, key, attempt, token).
        self._keys: list[tuple[float, str, int, str]] = []

    def add(
        self,
        key: str,
        state: State,
        attempt: int,
        lease_until: float,
        expires_at: float,
        forget_at: float,
        token: str = "",
    ) -> None:
        """One record; ``token`` its owner's, which tells when the claim was taken."""
        if forget_at <= self.now:
            self.expired += 1
        elif state is State.IN_FLIGHT:
            self.in_flight += 1
            if self.oldest is None or lease_until < self.oldest:
                self.oldest = lease_until
            if self.limit:
                entry = (-lease_until, key, attempt, token)
                if len(self._keys) < self.limit:
                    heapq.heappush(self._keys, entry)
                elif entry > self._keys[0]:
                    heapq.heapreplace(self._keys, entry)
        elif expires_at > self.now:
            self.completed += 1
        else:
            self.tombstones += 1

    def result(self) -> StoreStats:
        keys = sorted(self._keys, reverse=True)
        return StoreStats(
            in_flight=self.in_flight,
            completed=self.completed,
            tombstones=self.tombstones,
            expired=self.expired,
            oldest_lease_left=None if self.oldest is None else self.oldest - self.now,
            in_flight_keys=tuple(
                in_flight_key(key, attempt, -neg, token, self.now)
                for neg, key, attempt, token in keys
            ),
        )


def in_flight_key(
    key: str, attempt: int, lease_until: float, token: str, now: float
) -> InFlightKey:
    """The listed key in flight, at the store's clock ``now``: its hash, lease left and age."""
    claimed = claimed_at(token)
    return InFlightKey(
        key_hash(key), attempt, lease_until - now, None if claimed is None else now - claimed
    )


def stats_of(records: Iterable[Record], *, now: float, limit: int) -> StoreStats:
    counter = StatsCounter(now, limit)
    for r in records:
        counter.add(r.key, r.state, r.attempt, r.lease_until, r.expires_at, r.forget_at, r.token)
    return counter.result()
