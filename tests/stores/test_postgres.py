"""What only the PostgreSQL store has: schemas, migrations, one statement per operation on the
wire (prepared on the server, or not), claims that write only when they win, the server's clock,
its pool, and the handler's own transaction. Against the real server.
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
from oncely.stores import open_async_store
from oncely.stores._postgres_sql import claim_batch_params, claim_params, claim_result
from oncely.stores._rules import new_token
from oncely.stores.postgres import CLAIM_TRIES, PURGE_BATCH, AsyncPostgresStore

from .backend_postgres import URL, postgres_store, scratch_schema

FP = "v1:" + "a" * 64
OTHER_FP = "v1:" + "b" * 64
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}')


def new_key() -> str:
    return uuid.uuid4().hex


async def claimed(store: AsyncPostgresStore, key: str, fp: str = FP, lease: float = 60) -> Claimed:
    result = await store.claim(key, fp, lease=lease)
    assert isinstance(result, Claimed), result
    return result


async def existing(
    store: AsyncPostgresStore, key: str, fp: str = FP, lease: float = 60
) -> Existing:
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
async def store(schema: str) -> AsyncIterator[AsyncPostgresStore]:
    async with postgres_store(schema) as made:
        yield made


# Schemas and migrations


async def test_open_store_reads_both_url_schemes(schema: str) -> None:
    for url in (URL, URL.replace("postgresql://", "postgres://", 1)):
        store = open_async_store(url, schema=schema)
        assert isinstance(store, AsyncPostgresStore)
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
    store: AsyncPostgresStore, schema: str
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


async def test_migrate_is_idempotent(store: AsyncPostgresStore, schema: str) -> None:
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
        AsyncPostgresStore(URL, table="t" * 60)
    with pytest.raises(ConfigurationError):
        AsyncPostgresStore(URL, schema="")


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


def assert_one_statement(lines: list[str], command: str, *, prepared: bool) -> None:
    """One statement, one round trip. ``prepared``: a statement prepared on the server before is
    bound and run, nothing parsed; else the unnamed statement is parsed, bound and run."""
    binds = sent(lines, "Bind")
    assert len(binds) == 1, lines
    if prepared:
        assert sent(lines, "Parse") == [], lines
        assert re.match(r'F\t\d+\tBind\t "" "[^"]+" ', binds[0]), binds  # a named statement
    else:
        parses = sent(lines, "Parse")
        assert len(parses) == 1, lines
        assert re.match(r'F\t\d+\tParse\t "" ', parses[0]), parses  # the unnamed statement
        assert re.match(r'F\t\d+\tBind\t "" "" ', binds[0]), binds
    assert sent(lines, "Query") == [], lines
    assert len(sent(lines, "Sync")) == 1, lines
    completes = received(lines, "CommandComplete")
    assert len(completes) == 1, lines
    assert f'"{command}' in completes[0], completes
    assert len(received(lines, "ReadyForQuery")) == 1, lines


async def every_operation(
    store: AsyncPostgresStore,
) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """Each store operation once on a new key, in an order where each succeeds; with the
    command tag its statement ends with."""
    key = new_key()
    box: list[Any] = []

    async def claim_new() -> None:
        won = await store.claim(key, FP, lease=60)
        assert isinstance(won, Claimed)
        box.append(won)

    async def claim_again() -> None:
        assert isinstance(await store.claim(key, FP, lease=60), Existing)

    async def renew() -> None:
        assert await store.renew(box[0], lease=60)

    async def record_phase() -> None:
        assert await store.record_phase(box[0], "charged", '{"id":1}')

    async def release() -> None:
        assert await store.release(box[0])

    async def claim_takeover() -> None:
        owner = await store.claim(key, FP, lease=60)
        assert isinstance(owner, Claimed)
        assert owner.attempt == 2
        box.append(owner)

    async def complete() -> None:
        assert await store.complete(box[1], RESPONSE, ttl=10, tombstone_ttl=10)

    async def claim_replay() -> None:
        seen = await store.claim(key, FP, lease=60)
        assert isinstance(seen, Existing)
        assert seen.record.state is State.COMPLETED

    async def get() -> None:
        assert await store.get(key) is not None

    return [
        ("SELECT 1", claim_new),
        ("SELECT 1", claim_again),
        ("UPDATE 1", renew),
        ("UPDATE 1", record_phase),
        ("SELECT 1", release),
        ("SELECT 1", claim_takeover),
        ("UPDATE 1", complete),
        ("SELECT 1", claim_replay),
        ("SELECT 1", get),
    ]


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "prepare_threshold=None"])
async def test_each_operation_is_one_statement_on_the_wire(schema: str, prepared: bool) -> None:
    wire = Wire()
    options: dict[str, Any] = {} if prepared else {"prepare_threshold": None}
    async with postgres_store(
        schema, min_size=1, max_size=1, configure=wire.configure, **options
    ) as store:
        await store.migrate()  # first use: the table exists from here on
        if prepared:
            # The first run of each statement on the connection prepares it: once each.
            async def first_runs() -> None:
                for _, operation in await every_operation(store):
                    await operation()

            lines = await wire.messages(first_runs)
            names = [re.match(r'F\t\d+\tParse\t "([^"]*)"', line) for line in sent(lines, "Parse")]
            assert all(name is not None and name[1] for name in names), lines
            assert len({name[1] for name in names if name is not None}) == len(names) == 6, lines
        for command, operation in await every_operation(store):
            assert_one_statement(await wire.messages(operation), command, prepared=prepared)


# A claim writes only when it wins


async def row_version(store: AsyncPostgresStore, key: str) -> tuple[str, str, str]:
    """(xmin, xmax, ctid) of the key's row: an UPDATE makes a new version (new xmin and ctid),
    a row lock sets xmax."""
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT xmin::text, xmax::text, ctid::text FROM {} WHERE key = %s").format(
                sql.Identifier(store.schema, store.table)
            ),
            (key,),
        )
        row = await cur.fetchone()
        assert row is not None
        return row[0], row[1], row[2]


async def test_a_claim_that_finds_the_key_taken_writes_nothing(store: AsyncPostgresStore) -> None:
    key = new_key()
    won = await claimed(store, key)
    in_flight = await row_version(store, key)
    assert (await existing(store, key)).record.token == won.token
    assert (await existing(store, key, OTHER_FP)).record.token == won.token
    assert await row_version(store, key) == in_flight

    assert await store.complete(won, RESPONSE, ttl=100, tombstone_ttl=100)
    completed = await row_version(store, key)
    assert completed != in_flight
    for _ in range(3):  # replays
        assert (await existing(store, key)).record.response == RESPONSE
    assert (await existing(store, key, OTHER_FP)).record.state is State.COMPLETED
    assert await row_version(store, key) == completed

    store.time_offset = 101  # past the replay window: the tombstone still refuses, unwritten
    assert (await existing(store, key)).record.state is State.COMPLETED
    assert await row_version(store, key) == completed
    store.time_offset = 201  # past forget_at: the claim starts over, and that is a write
    again = await claimed(store, key)
    assert again.attempt == 1
    assert await row_version(store, key) != completed


async def test_a_replay_does_not_wait_for_a_transaction_holding_the_row(
    store: AsyncPostgresStore,
) -> None:
    key = new_key()
    won = await claimed(store, key)
    assert await store.complete(won, RESPONSE, ttl=100, tombstone_ttl=100)
    table = sql.Identifier(store.schema, store.table)
    async with await psycopg.AsyncConnection.connect(URL) as holder:
        await holder.execute(
            sql.SQL("SELECT key FROM {} WHERE key = %s FOR UPDATE").format(table), (key,)
        )
        async with asyncio.timeout(5):
            seen = await existing(store, key)
        assert seen.record.response == RESPONSE
        await holder.rollback()


async def transaction_id(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """The id of ``conn``'s open transaction, or None while it has none: PostgreSQL assigns one
    at the transaction's first write (a row inserted, updated, deleted or locked); a transaction
    without one writes no WAL and its commit flushes none."""
    cur = await conn.execute("SELECT pg_current_xact_id_if_assigned()::text")
    row = await cur.fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


async def test_claims_answered_by_the_record_take_no_transaction_id_and_a_win_does(
    store: AsyncPostgresStore,
) -> None:
    """The store's claim statements, alone and batched, run 100 times each in one transaction
    (on a connection of our own) on keys the caller cannot take: a completed record (the same
    fingerprint: a replay; another: a refusal), the same past its replay window (a tombstone),
    and a request in flight. Each answers the record as it is, and the transaction still has no
    id: no row was written or locked. A claim that wins (a new key, a record past forget_at)
    gets one."""
    done, running = new_key(), new_key()
    won = await claimed(store, done)
    assert await store.complete(won, RESPONSE, ttl=100, tombstone_ttl=100)
    await claimed(store, running)
    records = {key: await store.get(key) for key in (done, running)}
    s = store.statements
    taken = [  # (key, fingerprint, seconds later)
        (done, FP, 0.0),  # a replay
        (done, OTHER_FP, 0.0),  # the key reused for another request
        (done, FP, 150.0),  # past the replay window, before forget_at: a tombstone
        (running, FP, 0.0),
        (running, OTHER_FP, 0.0),
        (running, OTHER_FP, 150.0),  # its lease expired: taken over by the same request only
    ]

    def answer(row: tuple[Any, ...] | None, token: str) -> Any:
        assert row is not None
        return claim_result(row, token)

    async with await psycopg.AsyncConnection.connect(URL) as conn:
        for _ in range(100):
            for key, fp, later in taken:
                params = claim_params(key, fp, new_token(), lease=60, offset=later)
                cur = await conn.execute(s.claim, params, binary=True)
                seen = answer(await cur.fetchone(), params["token"])
                assert isinstance(seen, Existing), seen
                assert seen.record == records[key]
            # Past the lease, the request in flight is refused only to another fingerprint.
            for fp, later in ((FP, 0.0), (OTHER_FP, 0.0), (OTHER_FP, 150.0)):
                batch = [claim_params(k, fp, new_token(), lease=60, offset=later) for k in records]
                cur = await conn.execute(
                    s.claim_batch, claim_batch_params(batch, offset=later), binary=True
                )
                rows = await cur.fetchall()
                assert sorted(int(row[11]) for row in rows) == [1, 2], rows
                for row in rows:
                    seen = answer(row[:11], batch[int(row[11]) - 1]["token"])
                    assert isinstance(seen, Existing), seen
                    assert seen.record == records[seen.record.key]
        assert await transaction_id(conn) is None
        await conn.rollback()

        for key, later in ((new_key(), 0.0), (done, 201.0)):  # a new key; past forget_at
            params = claim_params(key, FP, new_token(), lease=60, offset=later)
            cur = await conn.execute(s.claim, params, binary=True)
            assert isinstance(answer(await cur.fetchone(), params["token"]), Claimed)
            assert await transaction_id(conn) is not None
            await conn.rollback()
            batch = [claim_params(key, FP, new_token(), lease=60, offset=later)]
            cur = await conn.execute(s.claim_batch, claim_batch_params(batch, offset=later))
            first = await cur.fetchone()
            assert first is not None
            assert isinstance(answer(first[:11], batch[0]["token"]), Claimed)
            assert await transaction_id(conn) is not None
            await conn.rollback()


@dataclass
class ClaimStatements:
    """Counts the claim statements a store runs, and what each returned."""

    store: AsyncPostgresStore
    returned: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        fetchone = self.store._fetchone

        async def counted(query: str, params: Any) -> tuple[Any, ...] | None:
            row = await fetchone(query, params)
            if query == self.store.statements.claim:
                self.returned.append(row is not None)
            return row

        self.store._fetchone = counted  # type: ignore[method-assign]


async def waiting_for_a_lock(store: AsyncPostgresStore) -> None:
    """Until one of the store's connections waits for a row lock."""
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as admin:
        async with asyncio.timeout(5):
            while True:
                cur = await admin.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    (f"%{store.schema}%",),
                )
                row = await cur.fetchone()
                if row is not None and row[0]:
                    return
                await asyncio.sleep(0.01)


async def test_a_claim_beaten_by_a_claim_committed_after_its_snapshot_runs_again(
    store: AsyncPostgresStore,
) -> None:
    """The statement's snapshot has no record, and the INSERT meets one committed meanwhile:
    the statement returns nothing, and the store runs it again, which reads that record."""
    await store.migrate()
    key = new_key()
    statements = ClaimStatements(store)
    table = sql.Identifier(store.schema, store.table)
    async with await psycopg.AsyncConnection.connect(URL) as other:
        await other.execute(
            sql.SQL(
                "INSERT INTO {} (key, fingerprint, state, token, attempt, lease_until, "
                "expires_at, forget_at) VALUES (%s, %s, 'in_flight', 'theirs', 1, %s, %s, %s)"
            ).format(table),
            (key, FP, 1e12, 1e12, 1e12),
        )
        claim = asyncio.create_task(store.claim(key, FP, lease=60))
        await waiting_for_a_lock(store)
        await other.commit()
    seen = await claim
    assert isinstance(seen, Existing), seen
    assert seen.record.token == "theirs"
    assert statements.returned == [False, True]


async def test_a_takeover_beaten_by_another_runs_again_and_sees_the_winner(
    store: AsyncPostgresStore,
) -> None:
    """The snapshot has a record the claim could take over; another takeover commits first."""
    key = new_key()
    first = await claimed(store, key, lease=10)
    store.time_offset = 11
    statements = ClaimStatements(store)
    table = sql.Identifier(store.schema, store.table)
    async with await psycopg.AsyncConnection.connect(URL) as other:
        await other.execute(
            sql.SQL(
                "UPDATE {} SET token = 'theirs', attempt = 2, lease_until = %s WHERE key = %s"
            ).format(table),
            (1e12, key),
        )
        claim = asyncio.create_task(store.claim(key, FP, lease=10))
        await waiting_for_a_lock(store)
        await other.commit()
    seen = await claim
    assert isinstance(seen, Existing), seen
    assert seen.record.token == "theirs"
    assert seen.record.attempt == 2
    assert statements.returned == [False, True]
    assert not await store.complete(first, RESPONSE, ttl=10, tombstone_ttl=10)


async def test_a_claim_that_never_gets_an_answer_is_store_unavailable(
    store: AsyncPostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    async def nothing(query: str, params: Any) -> None:
        calls.append(query)

    monkeypatch.setattr(store, "_fetchone", nothing)
    with pytest.raises(StoreUnavailable, match="no answer"):
        await store.claim(new_key(), FP, lease=10)
    assert calls == [store.statements.claim] * CLAIM_TRIES


# Prepared statements


async def test_statements_are_prepared_by_default_and_not_with_prepare_threshold_none(
    schema: str,
) -> None:
    for options, expected in (({}, 0), ({"prepare_threshold": None}, None)):
        wire = Wire()
        async with postgres_store(schema, configure=wire.configure, **options) as store:
            assert store.prepare_threshold == expected
            await claimed(store, new_key())
            assert [conn.prepare_threshold for conn in wire.connections] == [expected]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?prepare_threshold=none", None),
        ("?prepare_threshold=None", None),
        ("?prepare_threshold=", None),
        ("?prepare_threshold=3", 3),
        ("?application_name=mine&prepare_threshold=none&connect_timeout=2", None),
        ("?application_name=mine", 0),
    ],
)
async def test_prepare_threshold_in_the_url(schema: str, query: str, expected: int | None) -> None:
    wire = Wire()
    store = open_async_store(URL + query, schema=schema, configure=wire.configure)
    assert isinstance(store, AsyncPostgresStore)
    try:
        assert store.prepare_threshold == expected
        await claimed(store, new_key())
        (conn,) = wire.connections
        assert conn.prepare_threshold == expected
        if "application_name" in query:
            assert conn.info.parameter_status("application_name") == "mine"
    finally:
        await store.aclose()


def test_prepare_threshold_given_as_an_option_wins_and_bad_values_are_refused() -> None:
    given = AsyncPostgresStore.from_url(URL + "?prepare_threshold=none", prepare_threshold=2)
    assert given.prepare_threshold == 2
    assert AsyncPostgresStore.from_url(URL, prepare_threshold="none").prepare_threshold is None
    assert AsyncPostgresStore.from_url(URL, prepare_threshold="5").prepare_threshold == 5
    for bad in ("-1", "soon"):
        with pytest.raises(ConfigurationError, match="prepare_threshold"):
            AsyncPostgresStore.from_url(URL + f"?prepare_threshold={bad}")
    for value in (-1, 1.5, True):
        with pytest.raises(ConfigurationError, match="prepare_threshold"):
            AsyncPostgresStore(URL, prepare_threshold=value)  # type: ignore[arg-type]


async def test_the_claim_race_runs_on_many_pool_connections(schema: str) -> None:
    wire = Wire()
    async with postgres_store(schema, min_size=1, max_size=10, configure=wire.configure) as store:
        key = new_key()
        results = await asyncio.gather(*(store.claim(key, FP, lease=60) for _ in range(50)))
        assert len([r for r in results if isinstance(r, Claimed)]) == 1
        assert len(wire.connections) > 1


# Time comes from the server


async def test_leases_are_judged_by_the_server_clock_not_the_hosts(
    store: AsyncPostgresStore, monkeypatch: pytest.MonkeyPatch
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


async def insert_expired(store: AsyncPostgresStore, count: int) -> None:
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


async def test_purge_works_in_batches_up_to_its_limit(store: AsyncPostgresStore) -> None:
    total = PURGE_BATCH * 2 + 100
    await insert_expired(store, total)
    assert await store.purge(limit=PURGE_BATCH * 2 + 50) == PURGE_BATCH * 2 + 50
    assert await store.purge(limit=PURGE_BATCH) == 50
    assert await store.purge() == 0


async def test_purge_skips_rows_that_others_hold_instead_of_waiting(
    store: AsyncPostgresStore,
) -> None:
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
    store: AsyncPostgresStore,
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
    store: AsyncPostgresStore,
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
    store = AsyncPostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=1)
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
            store.time_offset = 61  # the lease is over: the claim takes over, a write that waits
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
        store.time_offset = 0
        assert (await existing(store, key)).record.fingerprint == FP


async def test_a_claim_survives_pooled_connections_killed_by_the_server(
    store: AsyncPostgresStore, schema: str
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
