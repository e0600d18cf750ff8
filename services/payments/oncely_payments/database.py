"""Transactions over the ledger's database, written once for SQLite and PostgreSQL.

A unit of work is a generator that yields operations (a query, a statement, an oncely recovery
point, oncely's stored response) and receives their results; it does no I/O itself. A driver
runs it inside ONE database transaction on the connection oncely's phases write to:

    def create(attempt, payment) -> Work[None]:
        yield Execute(INSERT_PAYMENT, {...})
        yield RecordPhase(attempt, "payment_created", {"id": payment.id})

    await db.write(create(attempt, payment))      # both commit together, or neither

- :class:`SQLiteDatabase`: the stdlib ``sqlite3`` on the store's file. A unit of work runs whole on
  a worker thread (one writer thread, so the ledger's writers queue in the process rather than
  on SQLite's file lock; two reader threads), in ``BEGIN IMMEDIATE`` for writes.
- :class:`PostgresDatabase`: psycopg's async pool, ``attempt.arecord``/``acomplete``.

Either may hold a ledger APART from the store (``shares_store_transaction=False``: a Redis store,
or a store in another database). No store write can then join the transaction, so the driver
keeps a unit of work's ``RecordPhase`` until after COMMIT and then records it with
``await attempt.checkpoint(name, data)``, in the store's own round trip; and it leaves
``CompleteAttempt`` to the middleware, which stores the response the handler returns. A crash
between COMMIT and the checkpoint (or the stored response) runs the phase again, so the units of
work are written to be idempotent by themselves (ledger.py, "A ledger apart from the store").

SQL is written once with ``%(name)s`` parameters (psycopg's style); SQLite gets ``:name``.
If a unit of work raises (a 404, a 412, ``LeaseLost``), the transaction rolls back. A database
that cannot be reached, or stays locked, is a 503 problem (``ledger-unavailable``): oncely
releases the key, keeps its recovery points, and the client's retry resumes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from oncely import Attempt, StoreUnavailable

from .problems import ApiProblem

__all__ = [
    "CompleteAttempt",
    "Database",
    "Execute",
    "Op",
    "PostgresDatabase",
    "Query",
    "RecordPhase",
    "Row",
    "SQLiteDatabase",
    "Work",
    "execute",
    "query",
    "unavailable",
]

T = TypeVar("T")
Row = tuple[Any, ...]
log = logging.getLogger("oncely_payments")


@dataclass(frozen=True, slots=True)
class Query:
    """Run a SELECT (or ... RETURNING); the driver answers with its rows."""

    sql: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Execute:
    """Run a statement; the driver answers with the number of rows it changed."""

    sql: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RecordPhase:
    """oncely: record recovery point ``name`` in this transaction."""

    attempt: Attempt
    name: str
    data: Any


@dataclass(frozen=True, slots=True)
class CompleteAttempt:
    """oncely: store the response in this transaction, which commits the effect."""

    attempt: Attempt
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


Op = Query | Execute | RecordPhase | CompleteAttempt
Work = Generator[Op, Any, T]


def query(sql: str, **params: Any) -> Generator[Op, Any, list[Row]]:
    """``rows = yield from query(SQL, id=...)``: typed rows for a unit of work."""
    rows: list[Row] = yield Query(sql, params)
    return rows


def execute(sql: str, **params: Any) -> Generator[Op, Any, int]:
    """``changed = yield from execute(SQL, id=...)``."""
    changed: int = yield Execute(sql, params)
    return changed


def unavailable(exc: BaseException) -> ApiProblem:
    return ApiProblem(
        503,
        "ledger-unavailable",
        "The ledger is unavailable",
        f"The payments database did not answer ({type(exc).__name__}). Nothing is lost: retry "
        "the same request with the same Idempotency-Key.",
        headers=[("retry-after", "1")],
    )


@functools.lru_cache(maxsize=256)
def _sqlite_sql(sql: str) -> str:
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


class Database(Protocol):
    dialect: str
    # False: a ledger apart from the store (see the module docstring).
    shares_store_transaction: bool

    async def write(self, work: Work[T], *, before_commit: Callable[[], None] | None = None) -> T:
        """Run ``work`` in a write transaction; ``before_commit`` runs just before COMMIT."""
        ...

    async def read(self, work: Work[T]) -> T: ...

    async def ready(self) -> bool:
        """Whether the database answers."""
        ...

    async def aclose(self) -> None: ...


class SQLiteDatabase:
    """The ledger in a SQLite file: the same file as oncely's ``sqlite:`` store."""

    dialect = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        schema: Iterable[str] = (),
        busy_timeout: float = 30.0,
        shares_store_transaction: bool = True,
    ):
        self.path = path
        self.shares_store_transaction = shares_store_transaction
        self._timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-write")
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ledger-read")
        conn = self._connect()
        try:
            for statement in schema:
                try:
                    conn.execute(statement)
                except sqlite3.OperationalError as exc:
                    # SQLite has no ADD COLUMN IF NOT EXISTS: a column already added is fine.
                    if "duplicate column name" not in str(exc):
                        raise
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=self._timeout, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _run(
        self,
        work: Work[T],
        begin: str,
        before_commit: Callable[[], None] | None,
        later: list[RecordPhase] | None,
    ) -> T:
        try:
            conn = self._conn()
            conn.execute(begin)
        except sqlite3.OperationalError as exc:
            raise unavailable(exc) from exc
        try:
            result = _drive(conn, work, later)
            if before_commit is not None:
                before_commit()
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise unavailable(exc) from exc
            raise
        return result

    async def write(self, work: Work[T], *, before_commit: Callable[[], None] | None = None) -> T:
        loop = asyncio.get_running_loop()
        later: list[RecordPhase] | None = None if self.shares_store_transaction else []
        result = await loop.run_in_executor(
            self._writer, self._run, work, "BEGIN IMMEDIATE", before_commit, later
        )
        if later:
            await _checkpoint(later)
        return result

    async def read(self, work: Work[T]) -> T:
        loop = asyncio.get_running_loop()
        later: list[RecordPhase] | None = None if self.shares_store_transaction else []
        return await loop.run_in_executor(self._readers, self._run, work, "BEGIN", None, later)

    async def ready(self) -> bool:
        def probe() -> bool:
            row: Row | None = self._conn().execute("SELECT 1").fetchone()
            return row == (1,)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, probe)
        except sqlite3.Error:
            return False

    def _close_all(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    async def aclose(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._close_all()


def _drive(conn: sqlite3.Connection, work: Work[T], later: list[RecordPhase] | None) -> T:
    """Run ``work`` on ``conn``; with ``later`` (a ledger apart from the store) its recovery
    points are kept there for after COMMIT and its response is left to the middleware."""
    value: Any = None
    while True:
        try:
            op = work.send(value)
        except StopIteration as done:
            result: T = done.value
            return result
        value = None
        if isinstance(op, Query):
            value = conn.execute(_sqlite_sql(op.sql), op.params).fetchall()
        elif isinstance(op, Execute):
            value = conn.execute(_sqlite_sql(op.sql), op.params).rowcount
        elif later is not None:
            if isinstance(op, RecordPhase):
                later.append(op)
        elif isinstance(op, RecordPhase):
            op.attempt.record(conn, op.name, op.data)
        else:
            op.attempt.complete(conn, op.status, op.headers, op.body)


async def _checkpoint(later: list[RecordPhase]) -> None:
    """The recovery points of a unit of work that has committed, in the store's own writes.

    ``LeaseLost`` propagates: the attempt was taken over and stops. A store that stays down
    (``checkpoint`` retries while the lease holds) costs only the point, never the phase: the
    phase is idempotent, and the next attempt that lacks the point runs it again to no effect.
    """
    for op in later:
        try:
            await op.attempt.checkpoint(op.name, op.data)
        except StoreUnavailable as exc:
            log.warning(
                "recovery point %r not recorded (%s); a retry redoes its phase", op.name, exc
            )


class PostgresDatabase:
    """The ledger in PostgreSQL, through psycopg's async connection pool.

    ``options`` are libpq connection options (``-c search_path=...`` for a schema of one's own).
    """

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        schema: Iterable[str] = (),
        options: str | None = None,
        max_size: int = 10,
        shares_store_transaction: bool = True,
    ) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        kwargs: dict[str, Any] = {"connect_timeout": 5}
        if options is not None:
            kwargs["options"] = options
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=max_size, open=False, kwargs=kwargs, timeout=5.0
        )
        self._down = psycopg.OperationalError
        self.shares_store_transaction = shares_store_transaction
        self._schema = tuple(schema)
        self._pool_opened = False
        self._created = False
        self._opening = asyncio.Lock()

    async def _open(self) -> None:
        if not self._created:
            async with self._opening:
                if not self._pool_opened:
                    await self._pool.open(wait=False)
                    self._pool_opened = True
                if not self._created:
                    await self._create()
                    self._created = True

    async def _create(self) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            # One process creates the tables at a time.
            await conn.execute("SELECT pg_advisory_xact_lock(4242)")
            for statement in self._schema:
                await conn.execute(statement)

    def _later(self) -> list[RecordPhase] | None:
        return None if self.shares_store_transaction else []

    async def write(self, work: Work[T], *, before_commit: Callable[[], None] | None = None) -> T:
        later = self._later()
        try:
            await self._open()
            async with self._pool.connection() as conn, conn.transaction():
                result = await _adrive(conn, work, later)
                if before_commit is not None:
                    before_commit()
        except self._down as exc:
            raise unavailable(exc) from exc
        if later:
            await _checkpoint(later)
        return result

    async def read(self, work: Work[T]) -> T:
        try:
            await self._open()
            async with self._pool.connection() as conn, conn.transaction():
                return await _adrive(conn, work, self._later())
        except self._down as exc:
            raise unavailable(exc) from exc

    async def ready(self) -> bool:
        try:
            await self._open()
            async with self._pool.connection(timeout=2) as conn:
                cur = await conn.execute("SELECT 1")
                return await cur.fetchone() == (1,)
        except Exception:
            return False

    async def aclose(self) -> None:
        await self._pool.close()


async def _adrive(conn: Any, work: Work[T], later: list[RecordPhase] | None) -> T:
    """:func:`_drive` on a psycopg async connection."""
    value: Any = None
    while True:
        try:
            op = work.send(value)
        except StopIteration as done:
            result: T = done.value
            return result
        value = None
        if isinstance(op, Query):
            cur = await conn.execute(op.sql, op.params)
            value = await cur.fetchall()
        elif isinstance(op, Execute):
            cur = await conn.execute(op.sql, op.params)
            value = cur.rowcount
        elif later is not None:
            if isinstance(op, RecordPhase):
                later.append(op)
        elif isinstance(op, RecordPhase):
            await op.attempt.arecord(conn, op.name, op.data)
        else:
            await op.attempt.acomplete(conn, op.status, op.headers, op.body)
