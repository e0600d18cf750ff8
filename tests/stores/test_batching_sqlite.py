"""Natural batching in the async SQLite store, on real files.

Writes queued while the worker thread runs a batch run together next, in one write transaction:
the statements the worker's connection runs are traced, so commits are counted where they
happen. Conflicting operations for one key in one batch answer as one after another in queue
order; a batch that cannot take the write lock fails every member and applies nothing; no batch
is larger than ``max_size``; repeats answered by a read take no write lock at all.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from oncely import Claimed, Existing, StoredResponse, StoreUnavailable
from oncely.stores.sqlite import AsyncSQLiteStore

from ..conftest import Clock

RESPONSE = StoredResponse(status=201, headers=(("content-type", "text/plain"),), body=b"ok")
FP = "fp"


class Traced:
    def __init__(self, store: AsyncSQLiteStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.statements: list[str] = []

    def count(self, prefix: str) -> int:
        return sum(1 for s in self.statements if s.upper().startswith(prefix))


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[Traced]:
    clock = Clock()
    store = AsyncSQLiteStore(tmp_path / "batch.db", clock=clock, busy_timeout=0.3)
    await store.migrate()  # the worker's connection, made on the worker thread
    (conn,) = store.sync._connections
    seen = Traced(store, clock)
    conn.set_trace_callback(seen.statements.append)
    try:
        yield seen
    finally:
        await store.aclose()


async def test_concurrent_claims_share_one_commit(traced: Traced) -> None:
    store = traced.store
    results = await asyncio.gather(*(store.claim(f"k{i}", FP, lease=30) for i in range(20)))
    assert all(isinstance(r, Claimed) for r in results)
    assert traced.count("BEGIN IMMEDIATE") == 1
    assert traced.count("COMMIT") == 1
    done = await asyncio.gather(
        *(store.complete(r, RESPONSE, ttl=60, tombstone_ttl=60) for r in results)  # type: ignore[arg-type]
    )
    assert all(done)
    assert traced.count("COMMIT") == 2
    # Repeats of completed requests: answered by reads, no write lock taken.
    repeats = await asyncio.gather(*(store.claim(f"k{i}", FP, lease=30) for i in range(20)))
    assert all(isinstance(r, Existing) and r.record.response is not None for r in repeats)
    assert traced.count("BEGIN IMMEDIATE") == 2
    # A lone claim goes out at once, by itself.
    assert isinstance(await store.claim("alone", FP, lease=30), Claimed)
    assert traced.count("COMMIT") == 3


async def test_no_batch_is_larger_than_max_size(traced: Traced) -> None:
    store = traced.store
    store._batcher.max_size = 4
    results = await asyncio.gather(*(store.claim(f"k{i}", FP, lease=30) for i in range(10)))
    assert all(isinstance(r, Claimed) for r in results)
    assert traced.count("COMMIT") == 3


async def test_a_batch_that_cannot_take_the_lock_fails_every_member_and_applies_nothing(
    traced: Traced, tmp_path: Path
) -> None:
    store = traced.store
    first = await store.claim("owned", FP, lease=30)
    assert isinstance(first, Claimed)
    other = sqlite3.connect(tmp_path / "batch.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # held past the store's busy_timeout
    try:
        results = await asyncio.gather(
            *(store.claim(f"k{i}", FP, lease=30) for i in range(5)),
            store.complete(first, RESPONSE, ttl=60, tombstone_ttl=60),
            return_exceptions=True,
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    for i in range(5):
        assert await store.get(f"k{i}") is None
    record = await store.get("owned")
    assert record is not None
    assert record.state.value == "in_flight"
    assert await store.complete(first, RESPONSE, ttl=60, tombstone_ttl=60)


Step = Callable[[AsyncSQLiteStore, str], Awaitable[object]]


def shape(result: object) -> object:
    if isinstance(result, Claimed):
        return ("claimed", result.attempt, result.phases)
    if isinstance(result, Existing):
        return ("existing", result.record.state.value, result.record.attempt)
    return result


@pytest.mark.parametrize(
    ("claimed_first", "expired", "names"),
    [
        (False, False, ["claim", "claim"]),
        (True, True, ["complete", "claim"]),
        (True, True, ["claim", "complete"]),
        (True, False, ["release", "claim"]),
        (True, False, ["claim", "renew", "phase", "complete", "claim"]),
    ],
)
async def test_conflicting_operations_in_one_batch_answer_as_in_queue_order(
    traced: Traced, claimed_first: bool, expired: bool, names: list[str]
) -> None:
    store = traced.store
    answers: list[object] = []
    for n, together in enumerate((True, False)):
        key = f"key-{n}"
        first = await store.claim(key, FP, lease=1) if claimed_first else None
        if expired:
            traced.clock.advance(2)

        def step(name: str, key: str = key, first: object = first) -> Awaitable[object]:
            if name == "claim":
                return store.claim(key, FP, lease=1)
            assert isinstance(first, Claimed)
            if name == "complete":
                return store.complete(first, RESPONSE, ttl=60, tombstone_ttl=60)
            if name == "release":
                return store.release(first)
            if name == "renew":
                return store.renew(first, lease=30)
            return store.record_phase(first, "charged", "{}")

        commits = traced.count("COMMIT")
        if together:
            results = list(await asyncio.gather(*(step(name) for name in names)))
            assert traced.count("COMMIT") - commits == 1  # one batch
        else:
            results = [await step(name) for name in names]
        answers.append([shape(r) for r in results])
        record = await store.get(key)
        answers.append(None if record is None else (record.state.value, record.attempt))
    assert answers[:2] == answers[2:], answers
    if names == ["claim", "claim"]:
        assert answers[0] == [("claimed", 1, ()), ("existing", "in_flight", 1)]
