"""What only the PostgreSQL store has: schemas, migrations, one statement per operation on the
wire, the server's clock, its pool, and the handler's own transaction. Against the real server.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import pq, sql

from oncely import (
    Claimed,
    ConfigurationError,
    Existing,
    State,
    StoredResponse,
    StoreUnavailable,
)
from oncely.stores import open_store
from oncely.stores.postgres import PURGE_BATCH, PostgresStore

from .backend_postgres import URL, postgres_store, scratch_schema

FP = "v1:" + "a" * 64
OTHER_FP = "v1:" + "b" * 64
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}')


def new_key() -> str:
    return uuid.uuid4().hex


async def claimed(store: PostgresStore, key: str, fp: str = FP, lease: float = 60) -> Claimed:
    result = await store.claim(key, fp, lease=lease)
    assert isinstance(result, Claimed), result
    return result


async def existing(store: PostgresStore, key: str, fp: str = FP, lease: float = 60) -> Existing:
    result = await store.claim(key, fp, lease=lease)
    assert isinstance(result, Existing), result
    return result


async def server_now() -> float:
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        row = await cur.fetchone()
        assert row is not None
        return float(row[0])


async def objects_in(schema: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s",
            (schema,),
        )
        return {str(name) for (name,) in await cur.fetchall()}


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with scratch_schema() as name:
        yield name


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStore]:
    async with postgres_store(schema) as made:
        yield made


# Schemas and migrations


async def test_open_store_reads_both_url_schemes(schema: str) -> None:
    for url in (URL, URL.replace("postgresql://", "postgres://", 1)):
        store = open_store(url, schema=schema)
        assert isinstance(store, PostgresStore)
        try:
            await claimed(store, new_key())
        finally:
            await store.aclose()


async def test_stores_on_different_schemas_do_not_see_each_other() -> None:
    async with (
        scratch_schema() as one,
        scratch_schema() as two,
        postgres_store(one) as first,
        postgres_store(two) as second,
    ):
        key = new_key()
        mine = await claimed(first, key)
        theirs = await claimed(second, key, OTHER_FP)
        assert mine.token != theirs.token
        assert await first.complete(mine, RESPONSE, ttl=100, tombstone_ttl=100)
        record = await second.get(key)
        assert record is not None
        assert record.state is State.IN_FLIGHT
        assert record.fingerprint == OTHER_FP
        assert not await second.complete(mine, RESPONSE, ttl=100, tombstone_ttl=100)
        assert await second.purge() == 0
        first.time_offset = second.time_offset = 1_000
        assert await first.purge() == 1
        assert await first.get(key) is None
        assert await second.get(key) is not None


async def test_first_use_creates_the_table_and_indexes_in_the_named_schema(
    store: PostgresStore, schema: str
) -> None:
    assert await objects_in(schema) == set()
    assert await store.get(new_key()) is None
    assert await objects_in(schema) == {
        "oncely_records",
        "oncely_records_pkey",
        "oncely_records_forget_at",
        "oncely_records_expires_at",
    }


async def test_a_custom_table_name_and_a_name_that_needs_quoting(schema: str) -> None:
    async with postgres_store(schema, table="Idem Records") as store:
        await store.migrate()
        won = await claimed(store, new_key())
        assert await store.complete(won, RESPONSE, ttl=10, tombstone_ttl=10)
    assert "Idem Records" in await objects_in(schema)


async def test_migrate_is_idempotent(store: PostgresStore, schema: str) -> None:
    await store.migrate()
    key = new_key()
    won = await claimed(store, key)
    await store.migrate()
    await store.migrate()
    assert await store.complete(won, RESPONSE, ttl=10, tombstone_ttl=10)
    record = await store.get(key)
    assert record is not None
    assert record.response == RESPONSE
    assert len(await objects_in(schema)) == 4


async def test_concurrent_migrations_from_many_connections_do_not_race() -> None:
    # Without the advisory lock, CREATE SCHEMA/TABLE/INDEX IF NOT EXISTS from connections that
    # start together fail with unique violations in the catalog.
    for _ in range(3):
        async with scratch_schema() as schema, AsyncExitStack() as stack:
            stores = [
                await stack.enter_async_context(postgres_store(schema, min_size=1, max_size=1))
                for _ in range(8)
            ]
            await asyncio.gather(*(s.migrate() for s in stores))
            await asyncio.gather(*(s.migrate() for s in stores))
            assert len(await objects_in(schema)) == 4


async def test_processes_starting_together_on_a_new_schema_agree_on_one_winner() -> None:
    async with scratch_schema() as schema, AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(postgres_store(schema)) for _ in range(8)]
        key = new_key()
        results = await asyncio.gather(*(s.claim(key, FP, lease=60) for s in stores))
        winners = [r for r in results if isinstance(r, Claimed)]
        assert len(winners) == 1
        assert all(r.record.token == winners[0].token for r in results if isinstance(r, Existing))


async def test_names_too_long_for_postgres_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        PostgresStore(URL, table="t" * 60)
    with pytest.raises(ConfigurationError):
        PostgresStore(URL, schema="")


# One statement per operation, as the server sees it


@dataclass
class Wire:
    """The frontend/backend messages of the store's one connection, from libpq's trace."""

    connections: list[psycopg.AsyncConnection[Any]] = field(default_factory=list)

    async def configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.connections.append(conn)

    async def messages(self, operation: Callable[[], Awaitable[object]]) -> list[str]:
        assert len(self.connections) == 1
        pgconn = self.connections[0].pgconn
        fd, path = tempfile.mkstemp(prefix="oncely-trace-")
        try:
            pgconn.trace(fd)
            pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                await operation()
            finally:
                pgconn.untrace()
            return read_lines(path)
        finally:
            os.close(fd)
            os.unlink(path)


def read_lines(path: str) -> list[str]:
    with open(path) as file:
        return file.read().splitlines()


def sent(lines: list[str], message: str) -> list[str]:
    return [line for line in lines if re.match(rf"F\t\d+\t{message}\b", line)]


def received(lines: list[str], message: str) -> list[str]:
    return [line for line in lines if re.match(rf"B\t\d+\t{message}\b", line)]


def assert_one_statement(lines: list[str], command: str) -> None:
    """One statement, one round trip, and no named (server-side) prepared statement."""
    parses = sent(lines, "Parse")
    assert len(parses) == 1, lines
    assert re.match(r'F\t\d+\tParse\t "" ', parses[0]), parses  # the unnamed statement
    assert sent(lines, "Query") == [], lines
    assert len(sent(lines, "Sync")) == 1, lines
    completes = received(lines, "CommandComplete")
    assert len(completes) == 1, lines
    assert f'"{command}' in completes[0], completes
    assert len(received(lines, "ReadyForQuery")) == 1, lines


async def test_each_operation_is_one_statement_on_the_wire(schema: str) -> None:
    wire = Wire()
    async with postgres_store(schema, min_size=1, max_size=1, configure=wire.configure) as store:
        await store.migrate()  # first use: the table exists from here on
        key = new_key()
        box: list[Any] = []

        async def claim_new() -> None:
            box.append(await store.claim(key, FP, lease=60))

        assert_one_statement(await wire.messages(claim_new), "INSERT 0 1")
        won = box.pop()
        assert isinstance(won, Claimed)

        async def claim_again() -> None:
            box.append(await store.claim(key, FP, lease=60))

        assert_one_statement(await wire.messages(claim_again), "INSERT 0 1")
        assert isinstance(box.pop(), Existing)

        async def renew() -> None:
            assert await store.renew(won, lease=60)

        assert_one_statement(await wire.messages(renew), "UPDATE 1")

        async def record_phase() -> None:
            assert await store.record_phase(won, "charged", '{"id":1}')

        assert_one_statement(await wire.messages(record_phase), "UPDATE 1")

        async def release() -> None:
            assert await store.release(won)

        assert_one_statement(await wire.messages(release), "SELECT 1")

        async def claim_takeover() -> None:
            box.append(await store.claim(key, FP, lease=60))

        assert_one_statement(await wire.messages(claim_takeover), "INSERT 0 1")
        owner = box.pop()
        assert isinstance(owner, Claimed)
        assert owner.attempt == 2

        async def complete() -> None:
            assert await store.complete(owner, RESPONSE, ttl=10, tombstone_ttl=10)

        assert_one_statement(await wire.messages(complete), "UPDATE 1")

        async def get() -> None:
            assert await store.get(key) is not None

        assert_one_statement(await wire.messages(get), "SELECT 1")


async def test_the_claim_race_runs_on_many_pool_connections(schema: str) -> None:
    wire = Wire()
    async with postgres_store(schema, min_size=1, max_size=10, configure=wire.configure) as store:
        key = new_key()
        results = await asyncio.gather(*(store.claim(key, FP, lease=60) for _ in range(50)))
        assert len([r for r in results if isinstance(r, Claimed)]) == 1
        assert len(wire.connections) > 1


# Time comes from the server


async def test_leases_are_judged_by_the_server_clock_not_the_hosts(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This host's clock runs an hour behind: a lease computed from it would already be over.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    key = new_key()
    before = await server_now()
    won = await claimed(store, key, lease=10)
    after = await server_now()
    assert before + 10 <= won.lease_until <= after + 10
    seen = await existing(store, key)
    assert seen.record.token == won.token
    assert before <= seen.now <= await server_now()


async def test_stores_with_different_offsets_share_one_timeline(schema: str) -> None:
    async with postgres_store(schema) as here, postgres_store(schema) as there:
        key = new_key()
        won = await claimed(here, key, lease=10)
        there.time_offset = 5
        seen = await existing(there, key)
        assert seen.record.lease_until == won.lease_until
        assert seen.now - won.lease_until == pytest.approx(-5, abs=1)
        there.time_offset = 11  # past the lease on the shared clock: the retry takes over
        taken = await claimed(there, key, lease=10)
        assert taken.attempt == 2
        assert not await here.complete(won, RESPONSE, ttl=10, tombstone_ttl=10)
        assert (await existing(here, key)).record.token == taken.token


# Purge


async def insert_expired(store: PostgresStore, count: int) -> None:
    """``count`` completed records whose forget_at has passed, written in one statement."""
    await store.migrate()
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (key, fingerprint, state, token, attempt, lease_until, "
                "expires_at, forget_at) "
                "SELECT 'old-' || i, 'fp', 'completed', 't', 1, 0, 0, 0 "
                "FROM generate_series(1, %s) AS i"
            ).format(sql.Identifier(store.schema, store.table)),
            (count,),
        )


async def test_purge_works_in_batches_up_to_its_limit(store: PostgresStore) -> None:
    total = PURGE_BATCH * 2 + 100
    await insert_expired(store, total)
    assert await store.purge(limit=PURGE_BATCH * 2 + 50) == PURGE_BATCH * 2 + 50
    assert await store.purge(limit=PURGE_BATCH) == 50
    assert await store.purge() == 0


async def test_purge_skips_rows_that_others_hold_instead_of_waiting(store: PostgresStore) -> None:
    await insert_expired(store, 3)
    table = sql.Identifier(store.schema, store.table)
    async with await psycopg.AsyncConnection.connect(URL) as holder:
        await holder.execute(
            sql.SQL("SELECT key FROM {} WHERE key = 'old-2' FOR UPDATE").format(table)
        )
        async with asyncio.timeout(5):
            assert await store.purge() == 2
        await holder.rollback()
    assert await store.get("old-2") is not None
    assert await store.purge() == 1


# Recovery points, and the handler's own transaction


async def test_release_keeps_recovery_points_and_the_retry_resumes_from_them(
    store: PostgresStore,
) -> None:
    key = new_key()
    first = await claimed(store, key, lease=60)
    assert await store.record_phase(first, "payment_created", '{"id":7}')
    assert await store.release(first)
    record = await store.get(key)
    assert record is not None
    assert record.phases == (("payment_created", '{"id":7}'),)
    again = await claimed(store, key, lease=60)  # no waiting for the lease: it was ended
    assert again.attempt == 2
    assert again.phases == (("payment_created", '{"id":7}'),)
    assert not await store.record_phase(first, "late", "null")
    assert not await store.release(first)


async def test_phases_and_the_response_commit_with_the_handlers_transaction(
    store: PostgresStore,
) -> None:
    key = new_key()
    won = await claimed(store, key)
    async with await psycopg.AsyncConnection.connect(URL) as conn:
        query, params = store.phase_statement(won, "rolled_back", "1")
        cur = await conn.execute(query, params)
        assert cur.rowcount == 1
        await conn.rollback()
        record = await store.get(key)
        assert record is not None
        assert record.phases == ()

        async with conn.transaction():
            query, params = store.phase_statement(won, "payment_created", '{"id":7}')
            assert (await conn.execute(query, params)).rowcount == 1
            query, params = store.complete_statement(won, RESPONSE, ttl=100, tombstone_ttl=100)
            assert (await conn.execute(query, params)).rowcount == 1
            # Not visible to the store until the handler commits.
            seen = await store.get(key)
            assert seen is not None
            assert seen.state is State.IN_FLIGHT
    record = await store.get(key)
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.response == RESPONSE
    assert record.phases == (("payment_created", '{"id":7}'),)


# Failures become StoreUnavailable


async def test_an_unreachable_server_is_store_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=1)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await store.claim(new_key(), FP, lease=10)
        assert isinstance(raised.value.__cause__, psycopg.OperationalError)
    finally:
        await store.aclose()


async def test_a_statement_timeout_and_a_full_pool_are_store_unavailable(schema: str) -> None:
    async with postgres_store(
        schema, min_size=1, max_size=1, pool_timeout=0.2, statement_timeout=1.0
    ) as store:
        key = new_key()
        await claimed(store, key)
        table = sql.Identifier(store.schema, store.table)
        async with await psycopg.AsyncConnection.connect(URL) as holder:
            await holder.execute(
                sql.SQL("SELECT key FROM {} WHERE key = %s FOR UPDATE").format(table), (key,)
            )
            blocked = asyncio.create_task(store.claim(key, FP, lease=10))
            try:
                await asyncio.sleep(0.05)
                with pytest.raises(StoreUnavailable) as full:  # the one connection is busy
                    await store.get(key)
                assert isinstance(full.value.__cause__, psycopg.OperationalError)
            finally:
                with pytest.raises(StoreUnavailable) as cancelled:
                    await blocked
            assert isinstance(cancelled.value.__cause__, psycopg.errors.QueryCanceled)
            await holder.rollback()
        assert (await existing(store, key)).record.fingerprint == FP


async def test_a_claim_survives_pooled_connections_killed_by_the_server(
    store: PostgresStore, schema: str
) -> None:
    """After the server drops the pooled connections (a restart, a cut), claims still work."""
    await claimed(store, new_key())  # opens the pool; its connection last ran our claim
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND query LIKE %s",
            (f"%{schema}%",),
        )
        row = await cur.fetchone()
    assert row is not None
    assert row[0] >= 1
    for _ in range(3):
        await claimed(store, new_key())
