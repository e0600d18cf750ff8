"""Natural batching in the async PostgreSQL store, on the real server.

Writes queued while a round trip is out go out together: one transaction (BEGIN, one statement
per run of distinct keys for the claims, one for the completes, one each for the rest, COMMIT)
in one pipelined round trip. libpq's trace of the store's one connection shows what went on the
wire: round trips are counted as Syncs, transactions as COMMITs. Conflicting operations for one
key in one batch answer as one after another in queue order; a round trip cut on the wire fails
exactly its members and applies none of them (or, when the server committed before the cut, all
of them, and still reports none as done); no batch is larger than ``max_size``.

The cut is made by the TCP proxy of test_driver_failures.py: its trap resets the connection
carrying the next write that contains a key.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import pq, sql

from oncely import Claimed, Existing, StoredResponse, StoreUnavailable
from oncely.stores.postgres import AsyncPostgresStore

from ..realserver.proxy import StoreProxy
from .backend_postgres import URL, scratch_schema

RESPONSE = StoredResponse(status=201, headers=(("content-type", "text/plain"),), body=b"ok")
FP = "fp"


def new_key() -> str:
    return f"batch-pg-{secrets.token_hex(6)}"


@dataclass
class Traced:
    """The store (one connection, so one lane) and the messages sent on its connection."""

    store: AsyncPostgresStore
    connections: list[psycopg.AsyncConnection[Any]] = field(default_factory=list)

    async def configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.connections.append(conn)

    async def sent(self, operation: Callable[[], Awaitable[object]]) -> tuple[Any, list[str]]:
        """What ``operation`` returned, and the frontend messages it sent."""
        (conn,) = self.connections
        fd, path = tempfile.mkstemp(prefix="oncely-trace-")
        try:
            conn.pgconn.trace(fd)
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                result = await operation()
            finally:
                conn.pgconn.untrace()
            return result, read_sent(path)
        finally:
            os.close(fd)
            os.unlink(path)


def read_sent(path: str) -> list[str]:
    with open(path) as file:
        return [line for line in file.read().splitlines() if line.startswith("F\t")]


def count(lines: list[str], pattern: str) -> int:
    return sum(1 for line in lines if re.search(pattern, line))


def syncs(lines: list[str]) -> int:
    return count(lines, r"^F\t\d+\tSync\b")


def commits(lines: list[str]) -> int:
    return count(lines, r'^F\t\d+\tParse\t "" "COMMIT"')


@pytest.fixture
async def traced() -> AsyncIterator[Traced]:
    async with scratch_schema() as schema, AsyncExitStack() as stack:
        seen = Traced(None)  # type: ignore[arg-type]
        store = AsyncPostgresStore(
            URL,
            schema=schema,
            min_size=1,
            max_size=1,
            prepare_threshold=None,  # every statement parsed by its text: the trace names it
            configure=seen.configure,
        )
        stack.push_async_callback(store.aclose)
        await store.migrate()
        assert store._batcher.lanes == 1
        seen.store = store
        yield seen


async def test_concurrent_claims_share_one_round_trip_and_one_commit(traced: Traced) -> None:
    store = traced.store
    keys = [new_key() for _ in range(20)]

    async def claims() -> list[Claimed | Existing]:
        return list(await asyncio.gather(*(store.claim(key, FP, lease=30) for key in keys)))

    won, lines = await traced.sent(claims)
    assert all(isinstance(r, Claimed) for r in won), won
    assert (syncs(lines), commits(lines)) == (1, 1), lines
    assert count(lines, r"^F\t\d+\tParse\b") == 3, lines  # BEGIN, the twenty in one, COMMIT
    for key, result in zip(keys, won, strict=True):
        record = await store.get(key)
        assert record is not None
        assert record.token == result.token

    async def completes() -> list[bool]:
        return list(
            await asyncio.gather(
                *(store.complete(c, RESPONSE, ttl=60, tombstone_ttl=60) for c in won)
            )
        )

    done, lines = await traced.sent(completes)
    assert done == [True] * 20
    assert (syncs(lines), commits(lines)) == (1, 1), lines

    replays, lines = await traced.sent(claims)
    assert all(isinstance(r, Existing) and r.record.response == RESPONSE for r in replays)
    assert (syncs(lines), commits(lines)) == (1, 1), lines

    # A lone claim goes out at once, by itself: its one statement, no transaction around it.
    alone, lines = await traced.sent(lambda: store.claim(new_key(), FP, lease=30))
    assert isinstance(alone, Claimed)
    assert (syncs(lines), commits(lines)) == (1, 0), lines
    assert count(lines, "BEGIN") == 0


async def row_versions(store: AsyncPostgresStore, keys: list[str]) -> list[tuple[str, str, str]]:
    """(xmin, xmax, ctid) of each key's row: a write makes a new version, a row lock sets xmax."""
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT xmin::text, xmax::text, ctid::text FROM {} WHERE key = ANY(%s) ORDER BY key"
            ).format(sql.Identifier(store.schema, store.table)),
            (keys,),
        )
        return [(str(a), str(b), str(c)) for a, b, c in await cur.fetchall()]


async def test_a_batch_of_replays_and_refusals_writes_and_locks_no_row(traced: Traced) -> None:
    """Replays of completed keys, and claims of them with another fingerprint, queued together:
    one round trip, every answer the record, and no row touched (not even locked), so the
    batch's transaction takes no transaction id and its COMMIT writes no WAL. A new key alone
    is still one round trip."""
    store = traced.store
    keys = sorted(new_key() for _ in range(8))
    for key in keys:
        won = await store.claim(key, FP, lease=30)
        assert isinstance(won, Claimed)
        assert await store.complete(won, RESPONSE, ttl=60, tombstone_ttl=60)
    before = await row_versions(store, keys)
    assert len(before) == 8
    assert all(xmax == "0" for _, xmax, _ in before), before

    async def claims() -> list[Claimed | Existing]:
        return list(
            await asyncio.gather(
                *(store.claim(key, fp, lease=30) for key in keys for fp in (FP, "other"))
            )
        )

    for _ in range(3):
        seen, lines = await traced.sent(claims)
        assert all(isinstance(r, Existing) and r.record.response == RESPONSE for r in seen), seen
        assert [r.record.fingerprint for r in seen if isinstance(r, Existing)] == [FP] * 16
        assert (syncs(lines), commits(lines)) == (1, 1), lines
    assert await row_versions(store, keys) == before

    # Reading first costs a new key nothing: its claim is still one statement, one round trip.
    won, lines = await traced.sent(lambda: store.claim(new_key(), FP, lease=30))
    assert isinstance(won, Claimed)
    assert (syncs(lines), commits(lines)) == (1, 0), lines
    assert count(lines, r"^F\t\d+\tParse\b") == 1, lines


async def test_no_batch_is_larger_than_max_size(traced: Traced) -> None:
    store = traced.store
    store._batcher.max_size = 4
    results, lines = await traced.sent(
        lambda: asyncio.gather(*(store.claim(new_key(), FP, lease=30) for _ in range(10)))
    )
    assert all(isinstance(r, Claimed) for r in results)
    assert (syncs(lines), commits(lines)) == (3, 3), lines  # 4 + 4 + 2


def shape(result: object) -> object:
    """A result without its random parts (tokens, clocks)."""
    if isinstance(result, Claimed):
        return ("claimed", result.attempt, result.phases)
    if isinstance(result, Existing):
        return ("existing", result.record.state.value, result.record.attempt)
    if isinstance(result, BaseException):
        return type(result).__name__
    return result


CASES: dict[str, tuple[bool, bool, list[str]]] = {
    # name: (claimed first, lease expired first, steps)
    "claim and claim": (False, False, ["claim", "claim"]),
    "complete and takeover": (True, True, ["complete", "claim"]),
    "takeover and complete": (True, True, ["claim", "complete"]),
    "release and claim": (True, False, ["release", "claim"]),
    "claim, renew and record": (True, False, ["claim", "renew", "phase", "complete", "claim"]),
    "complete, replays, complete again": (True, True, ["complete", "claim", "claim", "complete"]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_conflicting_operations_in_one_batch_answer_as_in_queue_order(
    traced: Traced, case: str
) -> None:
    store = traced.store
    claimed_first, expired, names = CASES[case]
    answers: list[object] = []
    for together in (True, False):
        key = new_key()
        store.time_offset = 0
        first = await store.claim(key, FP, lease=1) if claimed_first else None
        if expired:
            store.time_offset = 2

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

        async def run(together: bool = together) -> list[object]:
            if together:
                return list(await asyncio.gather(*(step(name) for name in names)))
            return [await step(name) for name in names]

        results, lines = await traced.sent(run)
        if together:
            assert (syncs(lines), commits(lines)) == (1, 1), lines  # one batch
        answers.append([shape(r) for r in results])
        record = await store.get(key)
        answers.append(None if record is None else (record.state.value, record.attempt))
    assert answers[:2] == answers[2:], answers
    if case == "claim and claim":
        assert answers[0] == [("claimed", 1, ()), ("existing", "in_flight", 1)]
    if case == "complete and takeover":
        assert answers[0] == [True, ("existing", "completed", 1)]
    if case == "takeover and complete":
        assert answers[0] == [("claimed", 2, ()), False]


# Through the proxy: a round trip cut on the wire


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[AsyncPostgresStore, StoreProxy]]:
    async with scratch_schema() as schema, AsyncExitStack() as stack:
        proxy = stack.enter_context(StoreProxy(("127.0.0.1", 5432), protocol="postgres"))
        store = AsyncPostgresStore(
            f"postgresql://postgres@127.0.0.1:{proxy.port}/test",
            schema=schema,
            min_size=1,
            max_size=1,
            connect_timeout=2,
        )
        stack.push_async_callback(store.aclose)
        await store.migrate()
        yield store, proxy


async def test_a_round_trip_cut_before_the_server_fails_exactly_its_members_applying_none(
    proxied: tuple[AsyncPostgresStore, StoreProxy],
) -> None:
    """Twelve claims and a complete at once, in batches of five: the second round trip (claims
    5 to 8 and the complete) is cut at the write that carries key 7, which the server never
    sees, nor anything after it (its COMMIT and Sync). Its five members fail and none is
    applied; the others are claimed."""
    store, proxy = proxied
    owned = await store.claim(new_key(), FP, lease=30)
    assert isinstance(owned, Claimed)
    store._batcher.max_size = 5
    keys = [new_key() for _ in range(12)]
    trap = proxy.trap(keys[7].encode(), forward=False)
    calls: list[Awaitable[object]] = [store.claim(key, FP, lease=30) for key in keys[:9]]
    calls.append(store.complete(owned, RESPONSE, ttl=60, tombstone_ttl=60))
    calls += [store.claim(key, FP, lease=30) for key in keys[9:]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert trap.sprung.is_set()
    kinds = ["ok" if r is True or isinstance(r, Claimed) else type(r).__name__ for r in results]
    assert kinds == ["ok"] * 5 + ["StoreUnavailable"] * 5 + ["ok"] * 3, kinds
    record = await store.get(owned.key)
    assert record is not None
    assert record.state.value == "in_flight"
    for key, result in zip(keys, results[:9] + results[10:], strict=True):
        record = await store.get(key)
        if isinstance(result, StoreUnavailable):
            assert record is None  # nothing half-applied
        else:
            assert isinstance(result, Claimed)
            assert record is not None
            assert record.token == result.token
    # The store goes on, and the owner completes with its token.
    assert await store.complete(owned, RESPONSE, ttl=60, tombstone_ttl=60)


# The Sync message that ends a round trip (type S, length 4); the trap fires on the first write
# that carries one once it is armed.
SYNC = b"S\x00\x00\x00\x04"


async def test_a_reply_lost_after_the_commit_reports_no_member_done(
    proxied: tuple[AsyncPostgresStore, StoreProxy],
) -> None:
    """Five claims and a complete in one batch: the server gets all of it and commits, and the
    connection is cut before its answer arrives. Every member fails (the outcome is unknown to
    them), and the batch is applied whole."""
    store, proxy = proxied
    owned = await store.claim(new_key(), FP, lease=30)
    assert isinstance(owned, Claimed)
    keys = [new_key() for _ in range(5)]
    trap = proxy.trap(SYNC, forward=True)
    results = await asyncio.gather(
        *(store.claim(key, FP, lease=30) for key in keys),
        store.complete(owned, RESPONSE, ttl=60, tombstone_ttl=60),
        return_exceptions=True,
    )
    assert trap.sprung.is_set()
    assert trap.answered
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    record = await store.get(owned.key)
    assert record is not None
    assert record.state.value == "completed"
    for key in keys:
        record = await store.get(key)
        assert record is not None
        assert (record.state.value, record.attempt) == ("in_flight", 1)
    # A claim's retry with a new token finds the record in flight; the owner's repeated
    # complete learns that its response is the one stored.
    assert isinstance(await store.claim(keys[0], FP, lease=30), Existing)
    assert await store.complete(owned, RESPONSE, ttl=60, tombstone_ttl=60)
