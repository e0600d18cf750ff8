"""PostgreSQL: one table that every API host shares, judged by the server's clock.

- Times are epoch seconds (``double precision``) read from the SERVER clock,
  ``extract(epoch FROM clock_timestamp()) + time_offset``, so API hosts whose clocks disagree
  still agree on when a lease or a replay window ends. ``time_offset`` (seconds, default 0) is a
  public attribute; tests move time with it instead of sleeping.
- ``claim`` is ONE statement (one round trip) that writes only when the caller wins. It reads
  the record under the key; when there is one the caller cannot take (by the rule of
  ``stores/_rules.py``: a replay, a request in flight), that record and the server's now are the
  answer, and nothing is written: no new row version, no row lock, no WAL. Otherwise
  ``INSERT … ON CONFLICT (key) DO UPDATE … WHERE <the caller wins>`` takes the key and returns
  the new record. The caller owns the key exactly when the returned token is the one it
  proposed.
- The read sees the statement's snapshot, while ``ON CONFLICT`` judges the newest committed row.
  When another claim of the key commits between the two (the snapshot had no record, or one the
  caller could take, and the newest one is not), the statement returns no row and is run again:
  the new snapshot sees that commit. Each repeat needs yet another claim of the same key to
  commit in that short window, so a few are plenty; a claim that still has no answer after
  ``CLAIM_TRIES`` statements raises :class:`oncely.StoreUnavailable`.
- ``complete``, ``record_phase``, ``release`` and ``renew`` are one statement each, guarded by
  key, fencing token and ``state = 'in_flight'``. ``release`` deletes the record, or, when
  recovery points were recorded, expires its lease and keeps them: two data-modifying CTEs with
  exclusive conditions, in one statement. Recovery points are a ``jsonb`` array of
  ``[name, json_text]`` pairs; the response is a ``bytea`` in the shared codec's format.
- ``purge`` deletes records past ``forget_at`` in batches of at most 500 rows, each its own
  short statement taking only rows no one else holds (``FOR UPDATE SKIP LOCKED``), then strips
  the bodies of completed records past ``expires_at`` the same way (the tombstone keeps the
  fingerprint). An index on ``forget_at``, and a partial one on ``expires_at`` of records that
  still hold a body, keep both cheap.
- The table (``schema`` and ``table`` options, default ``public.oncely_records``) is created on
  first use when it is missing, or ahead of time with :meth:`PostgresStore.migrate`. Creation
  runs in one transaction under ``pg_advisory_xact_lock``, so processes starting together do
  not race, and only creates what is missing. A role without DDL rights works once the table
  exists.

Statements are prepared on the server: each of the store's few fixed statements is parsed and
planned once per connection, then only bound and executed (``prepare_threshold``, 0 by default,
is psycopg's: how many times a statement runs on a connection before it is prepared).

Fit for PgBouncer in transaction mode. The store keeps no session state: connections are in
autocommit, every operation is a single statement (its own transaction), ``migrate`` takes a
transaction-scoped lock only, and nothing is ``SET`` on a session. Prepared statements need
PgBouncer 1.21 or later with ``max_prepared_statements`` above 0, which tracks protocol-level
prepared statements across server connections. With an older PgBouncer, or with
``max_prepared_statements = 0``, pass ``prepare_threshold=None`` (or add
``?prepare_threshold=none`` to the URL): then only the unnamed statement of the extended protocol
is used. ``search_path`` is not relied on: every statement names the table with its schema,
quoted. One exception: ``statement_timeout`` is sent as a startup parameter
(``options=-c statement_timeout=…``), which PgBouncer refuses unless configured to accept it;
behind PgBouncer leave it unset and set it on the role instead
(``ALTER ROLE … SET statement_timeout = '5s'``).

The SQL is kept in module-level constants, rendered for one table by :func:`render_statements`,
and the rows are read back by :func:`record_from_row` and :func:`claim_result`, so that a
synchronous store can run the same statements.

Driver trouble (no server, a pool timeout, a failed statement) is raised as
:class:`oncely.StoreUnavailable`, chained to psycopg's error.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote_plus

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from .._codec import (
    Claimed,
    Existing,
    Record,
    StoredResponse,
    encode_response,
    record_from_columns,
)
from .._errors import ConfigurationError, StoreUnavailable
from ._rules import ABANDONED_RETENTION, new_token

__all__ = ["CLAIM_TRIES", "PURGE_BATCH", "AsyncPostgresStore", "Statements", "render_statements"]

# Claim statements one claim runs at most while claims committed concurrently keep it from an
# answer (see the module docstring).
CLAIM_TRIES = 5

# Rows one purge statement deletes (or strips) at most: short statements, short row locks.
PURGE_BATCH = 500

_COLUMNS = (
    "key, fingerprint, state, token, attempt, lease_until, expires_at, forget_at, response, phases"
)

# The server's clock in epoch seconds, moved by the store's time_offset. Each statement reads it
# once: from a one-row CTE or FROM item, or as an uncorrelated subquery (which can bound an index
# scan). CAST is written out rather than `::`, so that the statements a handler runs through
# SQLAlchemy (where %(name)s becomes :name) stay unambiguous.
_CLOCK = (
    "CAST(extract(epoch FROM clock_timestamp()) AS double precision) "
    "+ CAST(%(offset)s AS double precision)"
)

_CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    key         text COLLATE "C" PRIMARY KEY,
    fingerprint text NOT NULL,
    state       text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    token       text NOT NULL,
    attempt     integer NOT NULL,
    lease_until double precision NOT NULL,
    expires_at  double precision NOT NULL,
    forget_at   double precision NOT NULL,
    response    bytea,
    phases      jsonb NOT NULL DEFAULT '[]'
)
"""

_CREATE_FORGET_INDEX = "CREATE INDEX IF NOT EXISTS {forget_index} ON {table} (forget_at)"

# Completed records that still hold a body, by the end of their replay window (claims write
# response = NULL, so only completed records are in it).
_CREATE_STRIP_INDEX = (
    "CREATE INDEX IF NOT EXISTS {strip_index} ON {table} (expires_at) WHERE response IS NOT NULL"
)

# Which of the store's objects exist: (schema, table, forget index, strip index).
_EXISTING = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %(schema)s),
       to_regclass(%(table)s) IS NOT NULL,
       to_regclass(%(forget_index)s) IS NOT NULL,
       to_regclass(%(strip_index)s) IS NOT NULL
"""

# Held until the end of the migrating transaction (fit for PgBouncer's transaction mode).
_MIGRATE_LOCK = "SELECT pg_advisory_xact_lock(%(lock)s)"

# The claim rule of stores/_rules.py in one statement; `clock` is read once.
#   standing: the record under the key, when the caller cannot take it (a replay, a request in
#             flight): it is the answer, and the INSERT does not run.
#   won:      otherwise the key is taken: inserted, or, on a conflict, the newest committed row
#             is overwritten when the caller wins against it (r.* is that row):
#     fresh:    the old record is past forget_at: start over (attempt 1, no recovery points)
#     takeover: in flight, lease expired, same fingerprint: new token, attempt + 1, phases kept
# At most one of the two has a row. Neither does when a claim committed after the statement's
# snapshot decides the conflict against the caller: the store runs the statement again.
_CLAIM = """
WITH clock AS MATERIALIZED (SELECT {clock} AS now),
standing AS MATERIALIZED (
    SELECT {columns} FROM {table} AS r
    WHERE r.key = %(key)s AND NOT {win}
),
won AS (
    INSERT INTO {table} AS r ({columns})
    SELECT %(key)s, %(fp)s, 'in_flight', %(token)s, 1,
           now + CAST(%(lease)s AS double precision),
           now + CAST(%(lease)s AS double precision),
           now + CAST(%(lease)s AS double precision) + CAST(%(retention)s AS double precision),
           NULL, '[]'
    FROM clock
    WHERE NOT EXISTS (SELECT 1 FROM standing)
    ON CONFLICT (key) DO UPDATE SET
        fingerprint = excluded.fingerprint,
        state       = 'in_flight',
        token       = excluded.token,
        attempt     = CASE WHEN {fresh} THEN 1 ELSE r.attempt + 1 END,
        lease_until = excluded.lease_until,
        expires_at  = excluded.expires_at,
        forget_at   = excluded.forget_at,
        response    = NULL,
        phases      = CASE WHEN {fresh} THEN '[]' ELSE r.phases END
    WHERE {win}
    RETURNING {returning}
)
SELECT {columns}, (SELECT now FROM clock) FROM won
UNION ALL
SELECT {columns}, (SELECT now FROM clock) FROM standing
"""
_FRESH = "(r.forget_at <= (SELECT now FROM clock))"
_TAKEOVER = (
    "(r.state = 'in_flight' AND r.lease_until <= (SELECT now FROM clock) "
    "AND r.fingerprint = %(fp)s)"
)

# Every write after a claim is fenced by the claim's token.
_OWNED = "key = %(key)s AND token = %(token)s AND state = 'in_flight'"

# Also run by handlers on their own connection, inside their transaction (TransactionalStore).
# Idempotent for its own token: completing again (a retry after a lost reply) matches the row
# and changes nothing, so the caller learns that its response is the one stored.
_COMPLETE = """
UPDATE {table}
SET response = CASE WHEN state = 'in_flight' THEN %(response)s ELSE response END,
    expires_at = CASE WHEN state = 'in_flight'
        THEN clock.now + CAST(%(ttl)s AS double precision) ELSE expires_at END,
    forget_at = CASE WHEN state = 'in_flight'
        THEN clock.now + CAST(%(ttl)s AS double precision)
             + CAST(%(tombstone_ttl)s AS double precision)
        ELSE forget_at END,
    state = 'completed'
FROM (SELECT {clock} AS now) AS clock
WHERE key = %(key)s AND token = %(token)s AND state IN ('in_flight', 'completed')
"""

_RECORD_PHASE = """
UPDATE {table}
SET phases = phases || jsonb_build_array(
    jsonb_build_array(CAST(%(name)s AS text), CAST(%(data)s AS text)))
WHERE {owned}
"""

# Without recovery points the record goes; with them, the lease ends now and they stay, so the
# next claim takes over and resumes. The two conditions exclude each other, so at most one of
# the CTEs touches the row.
_RELEASE = """
WITH gone AS (
    DELETE FROM {table} WHERE {owned} AND phases = '[]' RETURNING 1
), kept AS (
    UPDATE {table} SET lease_until = clock.now, expires_at = clock.now
    FROM (SELECT {clock} AS now) AS clock
    WHERE {owned} AND phases <> '[]'
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM kept)
"""

_RENEW = """
UPDATE {table}
SET lease_until = clock.now + CAST(%(lease)s AS double precision),
    expires_at = clock.now + CAST(%(lease)s AS double precision),
    forget_at = greatest(
        forget_at,
        clock.now + CAST(%(lease)s AS double precision)
        + CAST(%(retention)s AS double precision)
    )
FROM (SELECT {clock} AS now) AS clock
WHERE {owned}
"""

_GET = "SELECT {columns} FROM {table} WHERE key = %(key)s"

_PURGE_BATCH = """
WITH doomed AS (
    SELECT key FROM {table}
    WHERE forget_at <= (SELECT {clock})
    ORDER BY forget_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {table} AS r USING doomed WHERE r.key = doomed.key
"""

# Past the replay window a completed record keeps only its fingerprint (a tombstone).
_STRIP_BATCH = """
WITH stale AS (
    SELECT key FROM {table}
    WHERE response IS NOT NULL AND state = 'completed' AND expires_at <= (SELECT {clock})
    ORDER BY expires_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {table} AS r SET response = NULL FROM stale WHERE r.key = stale.key
"""

# Index names derive from the table name and must fit PostgreSQL's 63-byte identifiers.
_MAX_TABLE_BYTES = 63 - len("_expires_at")


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement of the store, rendered for one schema and table (shared by any variant).

    Parameters are psycopg's ``%(name)s``. ``table`` and the index names are also kept as quoted
    strings, as ``to_regclass`` reads them.
    """

    schema: str
    table: str
    forget_index: str
    strip_index: str
    migrate_lock: int
    create_schema: str
    create_table: str
    create_forget_index: str
    create_strip_index: str
    existing: str
    lock: str
    claim: str
    complete: str
    record_phase: str
    release: str
    renew: str
    get: str
    purge_batch: str
    strip_batch: str


def _check_identifier(what: str, name: str, max_bytes: int) -> None:
    if not name or "\0" in name or len(name.encode()) > max_bytes:
        raise ConfigurationError(
            f"{what} name {name!r} must be 1 to {max_bytes} bytes long, without NUL"
        )


def render_statements(schema: str, table: str) -> Statements:
    """The store's SQL for ``schema.table``, quoted with :class:`psycopg.sql.Identifier`."""
    _check_identifier("schema", schema, 63)
    _check_identifier("table", table, _MAX_TABLE_BYTES)
    forget_index, strip_index = f"{table}_forget_at", f"{table}_expires_at"
    names: dict[str, sql.Composable] = {
        "schema": sql.Identifier(schema),
        "table": sql.Identifier(schema, table),
        "forget_index": sql.Identifier(forget_index),
        "strip_index": sql.Identifier(strip_index),
        "columns": sql.SQL(_COLUMNS),
        "returning": sql.SQL(", ".join(f"r.{c.strip()}" for c in _COLUMNS.split(","))),
        "owned": sql.SQL(_OWNED),
        "clock": sql.SQL(_CLOCK),
        "fresh": sql.SQL(_FRESH),
        "takeover": sql.SQL(_TAKEOVER),
        "win": sql.SQL(f"({_FRESH} OR {_TAKEOVER})"),
    }

    def render(template: str) -> str:
        return sql.SQL(template).format(**names).as_string(None)

    digest = hashlib.blake2b(f"oncely migrate {schema}".encode(), digest_size=8).digest()
    return Statements(
        schema=schema,
        table=sql.Identifier(schema, table).as_string(None),
        forget_index=sql.Identifier(schema, forget_index).as_string(None),
        strip_index=sql.Identifier(schema, strip_index).as_string(None),
        migrate_lock=int.from_bytes(digest, "big", signed=True),
        create_schema=render(_CREATE_SCHEMA),
        create_table=render(_CREATE_TABLE),
        create_forget_index=render(_CREATE_FORGET_INDEX),
        create_strip_index=render(_CREATE_STRIP_INDEX),
        existing=render(_EXISTING),
        lock=render(_MIGRATE_LOCK),
        claim=render(_CLAIM),
        complete=render(_COMPLETE),
        record_phase=render(_RECORD_PHASE),
        release=render(_RELEASE),
        renew=render(_RENEW),
        get=render(_GET),
        purge_batch=render(_PURGE_BATCH),
        strip_batch=render(_STRIP_BATCH),
    )


def record_from_row(row: tuple[Any, ...]) -> Record:
    """A :class:`Record` from the first ten columns of a claim or get row."""
    return record_from_columns(row, row[9])


def claim_params(
    key: str, fingerprint: str, token: str, *, lease: float, offset: float
) -> dict[str, Any]:
    return {
        "key": key,
        "fp": fingerprint,
        "token": token,
        "lease": float(lease),
        "retention": ABANDONED_RETENTION,
        "offset": float(offset),
    }


def claim_result(row: tuple[Any, ...], token: str) -> Claimed | Existing:
    """What a claim that proposed ``token`` got, from the row the claim statement returned."""
    record = record_from_row(row)
    if record.token != token:
        return Existing(record, float(row[10]))
    return Claimed(
        key=record.key,
        fingerprint=record.fingerprint,
        token=token,
        attempt=record.attempt,
        lease_until=record.lease_until,
        phases=record.phases,
    )


def _take_query_option(url: str, name: str) -> tuple[str, str | None]:
    """``url`` without query parameter ``name``, and its last value (None when absent).

    Only URLs (``postgresql://…``) have a query; the other parameters are kept as written.
    """
    base, mark, query = url.partition("?")
    if not mark or "://" not in base:
        return url, None
    kept, value = [], None
    for part in query.split("&"):
        key, _, given = part.partition("=")
        if unquote_plus(key) == name:
            value = unquote_plus(given)
        else:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), value


def _threshold_from_text(text: str) -> int | None:
    word = text.strip().lower()
    if word in ("none", "null", "off", ""):
        return None
    try:
        return int(word)
    except ValueError:
        raise ConfigurationError(
            f"prepare_threshold must be a count >= 0 or none, not {text!r}"
        ) from None


ConfigureCallback = Callable[["psycopg.AsyncConnection[Any]"], Awaitable[None]]

T = TypeVar("T")

# Statements whose caller stopped waiting, left to finish in the background (see _promptly).
_ABANDONED: set[asyncio.Task[Any]] = set()


async def _promptly(call: Coroutine[Any, Any, T]) -> T:
    """Await ``call`` in a task of its own, so that a caller who stops waiting (a store timeout,
    a client gone) is let go at once.

    Cancelled mid-statement, psycopg first has the server cancel the statement and waits for
    that: up to 10 s against a server that does not answer, far past any store timeout. That
    now goes on in the background, and the connection returns to the pool (or is dropped) when
    it ends.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        _ABANDONED.add(task)
        task.add_done_callback(_forget)
        raise


def _forget(task: asyncio.Task[Any]) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()  # no one awaits it: mark its error as seen


class _PromptAttempt(AttemptWithBackoff):
    """Reconnection attempts 0.1 s apart at first, doubling to 1 s at most.

    psycopg's pool doubles from 1 s without bound: after a server outage of 8 s its next try
    came about 7 s after the server was back, past the lease of a request whose outcome was
    waiting to be written, and the retry after that lease ran the request a second time.
    """

    INITIAL_DELAY = 0.1
    MAX_DELAY = 1.0

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, self.MAX_DELAY)


class _Pool(AsyncConnectionPool[Any]):
    """psycopg's pool, reconnecting promptly once the server is back (see _PromptAttempt)."""

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        await super()._add_connection(
            attempt or _PromptAttempt(timeout=self.reconnect_timeout), growing=growing
        )


class AsyncPostgresStore:
    """Idempotency records in a PostgreSQL table (``postgresql://…``); see the module docstring.

    Options: ``schema`` and ``table`` name the table; ``min_size`` and ``max_size`` bound the
    connection pool, opened on first use; ``pool_timeout`` is how long an operation waits for a
    free connection, ``connect_timeout`` how long a new connection may take (the URL's own
    ``connect_timeout`` wins when this is not given); ``statement_timeout`` (seconds, unset by
    default) is sent as a startup parameter; ``time_offset`` is added to the server's clock;
    ``configure`` is awaited with each new connection (it must leave no session state behind if
    the store sits behind PgBouncer); ``prepare_threshold`` (0 by default, ``None`` for none) is
    how many times a statement runs on a connection before it is prepared on the server (see the
    module docstring about PgBouncer). :meth:`from_url` also reads it from the URL's query,
    ``?prepare_threshold=none`` or a count.

    Also a :class:`oncely.TransactionalStore`: recovery points and the response can be written
    by the handler's own psycopg (or SQLAlchemy) connection to the same database, inside its
    transaction.
    """

    dialect = "postgresql"
    # Every operation is a network round trip: a driver bounds it with its store_timeout.
    in_process = False

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = "public",
        table: str = "oncely_records",
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float = 5.0,
        connect_timeout: float | None = None,
        statement_timeout: float | None = None,
        time_offset: float = 0.0,
        configure: ConfigureCallback | None = None,
        prepare_threshold: int | None = 0,
    ) -> None:
        if min_size < 0 or max_size < 1 or max_size < min_size:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= min_size <= max_size, 1 <= max_size; "
                f"got min_size={min_size}, max_size={max_size}"
            )
        if pool_timeout <= 0:
            raise ConfigurationError(f"pool_timeout must be positive, not {pool_timeout!r}")
        if statement_timeout is not None and statement_timeout <= 0:
            raise ConfigurationError(
                f"statement_timeout must be positive or None, not {statement_timeout!r}"
            )
        if prepare_threshold is not None and (
            not isinstance(prepare_threshold, int)
            or isinstance(prepare_threshold, bool)
            or prepare_threshold < 0
        ):
            raise ConfigurationError(
                f"prepare_threshold must be a count >= 0 or None, not {prepare_threshold!r}"
            )
        try:
            given = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"not a PostgreSQL connection URL: {exc}") from None
        self.schema = schema
        self.table = table
        self.time_offset = time_offset
        self.statements = render_statements(schema, table)
        self._conninfo = conninfo
        self._min_size, self._max_size = min_size, max_size
        self._pool_timeout = pool_timeout
        self._configure = configure
        self.prepare_threshold = prepare_threshold
        kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": prepare_threshold}
        if connect_timeout is None:
            in_url = given.get("connect_timeout")
            connect_timeout = 5.0 if in_url is None else float(in_url)
        kwargs["connect_timeout"] = max(1, math.ceil(connect_timeout))
        if "application_name" not in given:
            kwargs["application_name"] = "oncely"
        if statement_timeout is not None:
            option = f"-c statement_timeout={math.ceil(statement_timeout * 1000)}"
            kwargs["options"] = f"{given['options']} {option}" if given.get("options") else option
        self._kwargs = kwargs
        self._open_timeout = float(kwargs["connect_timeout"])
        self._pool: AsyncConnectionPool | None = None
        self._ready = False
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> AsyncPostgresStore:
        """A store for ``url``; ``prepare_threshold`` may be in its query (an option given here
        wins), and is read from text as ``none`` or a count."""
        url, in_url = _take_query_option(url, "prepare_threshold")
        if in_url is not None:
            options.setdefault("prepare_threshold", in_url)
        threshold = options.get("prepare_threshold")
        if isinstance(threshold, str):
            options["prepare_threshold"] = _threshold_from_text(threshold)
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"AsyncPostgresStore(schema={self.schema!r}, table={self.table!r})"

    # Connections: the pool opens on first use, and the table is made ready once per store.

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        """The one error of this store: whatever psycopg or its pool raised, the store could
        not be used (not only ``psycopg.Error``: a closed transport under uvloop is a
        ``RuntimeError``). Cancellation is not an ``Exception`` and passes through."""
        if isinstance(exc, StoreUnavailable):
            return exc
        name = f"{self.schema}.{self.table}"
        return StoreUnavailable(f"PostgreSQL store {name} failed: {type(exc).__name__}: {exc}")

    async def _open(self) -> AsyncConnectionPool:
        async with self._lock:
            if self._pool is None:
                pool = _Pool(
                    self._conninfo,
                    kwargs=self._kwargs,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    open=False,
                    configure=self._configure,
                    timeout=self._pool_timeout,
                    name=f"oncely-{self.schema}.{self.table}",
                )
                try:
                    await pool.open(wait=self._min_size > 0, timeout=self._open_timeout)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            if not self._ready:
                async with self._pool.connection() as conn:
                    await self._migrate(conn, only_if_missing=True)
                self._ready = True
            return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            pool = self._pool if self._ready and self._pool is not None else await self._open()
            async with pool.connection() as conn:
                yield conn
        except Exception as exc:  # see _unavailable: any failure of the driver or the pool
            raise self._unavailable(exc) from exc

    async def _migrate(self, conn: psycopg.AsyncConnection[Any], *, only_if_missing: bool) -> None:
        s = self.statements
        names = {
            "schema": s.schema,
            "table": s.table,
            "forget_index": s.forget_index,
            "strip_index": s.strip_index,
        }
        if only_if_missing:
            cur = await conn.execute(s.existing, names, prepare=False)
            row = await cur.fetchone()
            if row is not None and all(row):
                return
        async with conn.transaction():
            await conn.execute(s.lock, {"lock": s.migrate_lock}, prepare=False)
            cur = await conn.execute(s.existing, names, prepare=False)
            row = await cur.fetchone()
            assert row is not None
            has_schema, has_table, has_forget, has_strip = row
            if not has_schema:
                await conn.execute(s.create_schema, prepare=False)
            if not has_table:
                await conn.execute(s.create_table, prepare=False)
            if not has_forget:
                await conn.execute(s.create_forget_index, prepare=False)
            if not has_strip:
                await conn.execute(s.create_strip_index, prepare=False)

    async def migrate(self) -> None:
        """Create the schema, table and indexes that are missing; safe to run at any time,
        from several processes at once."""
        async with self._connection() as conn:
            await self._migrate(conn, only_if_missing=False)

    async def _run(self, query: str, params: Mapping[str, Any], *, rows: bool) -> Any:
        """One statement on a pooled connection: its first row (``rows``), else its row count.

        The pool's ``getconn``/``putconn`` rather than its ``connection()`` context: in
        autocommit there is no transaction to end on the way out, and ``putconn`` still discards
        or resets a connection left broken or busy.
        """
        try:
            pool = self._pool if self._ready and self._pool is not None else await self._open()
            conn = await pool.getconn()
            try:
                cur = await conn.execute(query, params, binary=True)
                return await cur.fetchone() if rows else cur.rowcount
            finally:
                await pool.putconn(conn)
        except Exception as exc:  # see _unavailable: any failure of the driver or the pool
            raise self._unavailable(exc) from exc

    async def _fetchone(self, query: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await _promptly(self._run(query, params, rows=True))
        return row

    async def _rowcount(self, query: str, params: Mapping[str, Any]) -> int:
        count: int = await _promptly(self._run(query, params, rows=False))
        return count

    # The statements a handler runs on its own connection, in its own transaction
    # (oncely.TransactionalStore): the same ones the store runs.

    def complete_statement(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> tuple[str, dict[str, Any]]:
        """The completing UPDATE, for this store or for a handler's own transaction."""
        return self.statements.complete, {
            "key": claim.key,
            "token": claim.token,
            "response": encode_response(response),
            "ttl": float(ttl),
            "tombstone_ttl": float(tombstone_ttl),
            "offset": float(self.time_offset),
        }

    def phase_statement(self, claim: Claimed, name: str, data: str) -> tuple[str, dict[str, Any]]:
        """The UPDATE that appends recovery point (name, data JSON) while ``claim`` owns the key."""
        return self.statements.record_phase, {
            "key": claim.key,
            "token": claim.token,
            "name": name,
            "data": data,
        }

    # The store operations: one statement each (purge: one per batch).

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        token = new_token()
        params = claim_params(key, fingerprint, token, lease=lease, offset=self.time_offset)
        for _ in range(CLAIM_TRIES):
            try:
                row = await self._fetchone(self.statements.claim, params)
            except StoreUnavailable as exc:
                # A pooled connection that died (a database restart, a cut) fails once; the pool
                # drops it. Claiming again with the SAME token is safe: had the first statement
                # landed, the row carries this token and the claim is recognised as ours.
                cause = exc.__cause__
                if not isinstance(cause, psycopg.OperationalError) or isinstance(
                    cause, PoolTimeout | psycopg.errors.QueryCanceled
                ):
                    raise
                row = await self._fetchone(self.statements.claim, params)
            if row is not None:
                return claim_result(row, token)
            # No row: a claim committed after this statement's snapshot won the conflict. The
            # next statement's snapshot sees it (see the module docstring).
        raise StoreUnavailable(
            f"PostgreSQL store {self.schema}.{self.table} failed: a claim found no answer in "
            f"{CLAIM_TRIES} statements, as concurrent claims of its key kept committing"
        )

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        query, params = self.complete_statement(
            claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl
        )
        return await self._rowcount(query, params) == 1

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        query, params = self.phase_statement(claim, name, data)
        return await self._rowcount(query, params) == 1

    async def release(self, claim: Claimed) -> bool:
        params = {"key": claim.key, "token": claim.token, "offset": float(self.time_offset)}
        row = await self._fetchone(self.statements.release, params)
        return row is not None and row[0] == 1

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        params = {
            "key": claim.key,
            "token": claim.token,
            "lease": float(lease),
            "retention": ABANDONED_RETENTION,
            "offset": float(self.time_offset),
        }
        return await self._rowcount(self.statements.renew, params) == 1

    async def get(self, key: str) -> Record | None:
        row = await self._fetchone(self.statements.get, {"key": key})
        return None if row is None else record_from_row(row)

    async def _batches(self, query: str, limit: int) -> int:
        done = 0
        while done < limit:
            batch = min(PURGE_BATCH, limit - done)
            params = {"batch": batch, "offset": float(self.time_offset)}
            count = await self._rowcount(query, params)
            done += count
            if count < batch:
                break
        return done

    async def purge(self, *, limit: int = 1000) -> int:
        deleted = await self._batches(self.statements.purge_batch, limit)
        await self._batches(self.statements.strip_batch, limit)
        return deleted

    async def aclose(self) -> None:
        async with self._lock:
            pool, self._pool, self._ready = self._pool, None, False
        if pool is not None:
            await pool.close()
