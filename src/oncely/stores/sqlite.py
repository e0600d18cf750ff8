"""The embedded default: one SQLite file, safe for many processes on one host.

- WAL journal, so readers never wait for the writer; ``busy_timeout`` so concurrent writers from
  other processes queue instead of failing; ``synchronous=NORMAL`` by default (durable across a
  process crash; pass ``synchronous="FULL"`` to survive power loss too).
- ``claim`` is ONE statement: an UPSERT whose every column is a CASE over the old row, returning
  the row. The caller owns the key exactly when the returned token is the one it proposed.
- ``complete``, ``release`` and ``renew`` are single UPDATE/DELETE statements guarded by the
  fencing token.
- :class:`SQLiteStore` is the sync side and the implementation: each thread that uses it gets a
  connection of its own. :class:`AsyncSQLiteStore` runs the same store on one worker thread, so
  the event loop never waits on the file lock.
- A repeat of a completed or running request is answered by a read, without the write lock.
  Time is the host's clock (``clock``, injectable for tests): every process on the host shares it.
- Any failure of ``sqlite3`` (a lock held past ``busy_timeout``, a full disk, a bad file) is
  raised as :class:`oncely.StoreUnavailable`, on both sides.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .._codec import (
    Claimed,
    Existing,
    Record,
    StoredResponse,
    encode_response,
    record_from_columns,
)
from .._errors import ConfigurationError, StoreUnavailable
from ..events import StoreStats
from ._async._io import Batcher
from ._over_sync import AsyncOverSync
from ._rules import ABANDONED_RETENTION, claimable, new_token
from ._stats import in_flight_key

__all__ = ["AsyncSQLiteStore", "SQLiteStore"]

T = TypeVar("T")

_COLUMNS = (
    "key, fingerprint, state, token, attempt, lease_until, expires_at, forget_at, response, phases"
)

# A rowid table: its rows carry whole responses, and SQLite keeps rows that large better beside a
# key index than inside a WITHOUT ROWID b-tree (measured with benchmarks/stores.py: claims of
# new keys 30-40 % faster, replays 10-90 %, purge batches twice as fast). A file made as
# WITHOUT ROWID by an earlier version works unchanged.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL,
    token       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    lease_until REAL NOT NULL,
    expires_at  REAL NOT NULL,
    forget_at   REAL NOT NULL,
    response    BLOB,
    phases      TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS {table}_forget_at ON {table} (forget_at);
CREATE INDEX IF NOT EXISTS {table}_strip ON {table} (expires_at) WHERE response IS NOT NULL;
"""

# The claim rule of stores/_rules.py in one statement. In DO UPDATE, bare column names are the
# old row and excluded.* the proposed one; every CASE sees the old row.
#   fresh:    the old record is past forget_at: start over (attempt 1, no recovery points)
#   takeover: in flight, lease expired, same fingerprint: new token, attempt + 1, phases kept
_CLAIM = """
INSERT INTO {table} ({columns})
VALUES (:key, :fp, 'in_flight', :token, 1, :lease_until, :lease_until, :forget_at, NULL, '[]')
ON CONFLICT (key) DO UPDATE SET
    fingerprint = CASE WHEN {fresh} THEN excluded.fingerprint ELSE fingerprint END,
    state       = CASE WHEN {win} THEN 'in_flight' ELSE state END,
    attempt     = CASE WHEN {fresh} THEN 1 WHEN {takeover} THEN attempt + 1 ELSE attempt END,
    response    = CASE WHEN {win} THEN NULL ELSE response END,
    phases      = CASE WHEN {fresh} THEN '[]' ELSE phases END,
    lease_until = CASE WHEN {win} THEN excluded.lease_until ELSE lease_until END,
    expires_at  = CASE WHEN {win} THEN excluded.expires_at ELSE expires_at END,
    forget_at   = CASE WHEN {win} THEN excluded.forget_at ELSE forget_at END,
    token       = CASE WHEN {win} THEN excluded.token ELSE token END
RETURNING {columns}
"""
_FRESH = "(forget_at <= :now)"
_TAKEOVER = "(state = 'in_flight' AND lease_until <= :now AND fingerprint = excluded.fingerprint)"


def _claim_sql(table: str) -> str:
    return _CLAIM.format(
        table=table,
        columns=_COLUMNS,
        fresh=_FRESH,
        takeover=_TAKEOVER,
        win=f"({_FRESH} OR {_TAKEOVER})",
    )


def _record(row: tuple[Any, ...]) -> Record:
    return record_from_columns(row, json.loads(row[9]))


def _path_of(url: str) -> str:
    rest = url.split(":", 1)[1]
    if rest.startswith("///"):
        rest = rest[2:]  # sqlite:///abs/path.db -> /abs/path.db
    elif rest.startswith("//"):
        rest = rest[2:]  # sqlite://relative.db
    if not rest:
        raise ConfigurationError("a sqlite: store URL needs a file: 'sqlite:oncely.db'")
    return rest


def _one_row(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> bool:
    return int(conn.execute(sql, params).rowcount) == 1


@dataclass(frozen=True)
class _Write:
    """One queued write: ``write`` runs it; ``read`` (claims) may answer it without writing."""

    write: Callable[[sqlite3.Connection], object]
    read: Callable[[sqlite3.Connection], object | None] | None = None


class SQLiteStore:
    """Idempotency records in a SQLite file (``sqlite:PATH``), the sync side; safe for threads.

    Also a :class:`oncely.TransactionalStore`: recovery points and the response can be written
    by the handler's own ``sqlite3`` connection to the same file, inside its transaction.
    """

    dialect = "sqlite"
    # Waits are bounded by busy_timeout; the driver needs no timer of its own around them.
    in_process = True

    def __init__(
        self,
        path: str | Path,
        *,
        table: str = "oncely_records",
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
    ) -> None:
        if not table.isidentifier():
            raise ConfigurationError(f"table name {table!r} is not a plain SQL identifier")
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigurationError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = str(path)
        self.table = table
        self._clock = clock
        self._busy_ms = int(busy_timeout * 1000)
        self._synchronous = synchronous.upper()
        self._claim_sql = _claim_sql(table)
        self._get_sql = f"SELECT {_COLUMNS} FROM {table} WHERE key = ?"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> SQLiteStore:
        return cls(_path_of(url), **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, table={self.table!r})"

    @contextmanager
    def _edge(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection; any failure in the block is the store's one error."""
        try:
            yield self._conn()
        except StoreUnavailable:
            raise
        except Exception as exc:  # sqlite3.Error, a full disk, a file that is not a database ...
            raise StoreUnavailable(
                f"SQLite store {self.path!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, timeout=self._busy_ms / 1000, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            self._enable_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.executescript(_SCHEMA.format(table=self.table))
        except BaseException:
            conn.close()
            raise
        self._connections.append(conn)
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL, waiting out other processes doing the same.

        SQLite does not call the busy handler for a journal mode change, so two processes opening
        a new file at once would otherwise see "database is locked" right away.
        """
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def migrate(self) -> None:
        """Create the table and its index now (they are also created on first use)."""
        with self._edge():
            pass

    def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        with self._edge() as conn:
            return self._claim(conn, key, fingerprint, lease=lease)

    def _claim(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, *, lease: float
    ) -> Claimed | Existing:
        return self._claim_read(conn, key, fingerprint) or self._claim_write(
            conn, key, fingerprint, lease=lease
        )

    def _claim_read(self, conn: sqlite3.Connection, key: str, fingerprint: str) -> Existing | None:
        """The answer to a claim that cannot win, from a read alone; None: it may win."""
        now = self._clock()
        # A repeat of a completed or running request is the common case, and a read answers it
        # without taking the write lock. Whether the key is won is still decided by the single
        # UPSERT of _claim_write, atomically; this read only spares it when it could not win.
        row = conn.execute(self._get_sql, (key,)).fetchone()
        if row is not None:
            seen = _record(row)
            if not claimable(seen, fingerprint, now):
                return Existing(seen, now)
        return None

    def _claim_write(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, *, lease: float
    ) -> Claimed | Existing:
        now = self._clock()
        token = new_token(now)
        lease_until = now + lease
        row = conn.execute(
            self._claim_sql,
            {
                "key": key,
                "fp": fingerprint,
                "token": token,
                "lease_until": lease_until,
                "forget_at": lease_until + ABANDONED_RETENTION,
                "now": now,
            },
        ).fetchone()
        record = _record(row)
        if record.token != token:
            return Existing(record, now)
        return Claimed(
            key=key,
            fingerprint=fingerprint,
            token=token,
            attempt=record.attempt,
            lease_until=lease_until,
            phases=record.phases,
        )

    def complete_statement(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> tuple[str, dict[str, Any]]:
        """The completing UPDATE, for this store or for a handler's own transaction."""
        now = self._clock()
        # Idempotent for its own token: completing again (a retry after a lost reply) matches
        # the row and changes nothing.
        sql = (
            f"UPDATE {self.table} SET "
            "response = CASE WHEN state = 'in_flight' THEN :response ELSE response END, "
            "expires_at = CASE WHEN state = 'in_flight' THEN :expires_at ELSE expires_at END, "
            "forget_at = CASE WHEN state = 'in_flight' THEN :forget_at ELSE forget_at END, "
            "state = 'completed' "
            "WHERE key = :key AND token = :token AND state IN ('in_flight', 'completed')"
        )
        return sql, {
            "response": encode_response(response),
            "expires_at": now + ttl,
            "forget_at": now + ttl + tombstone_ttl,
            "key": claim.key,
            "token": claim.token,
        }

    def phase_statement(self, claim: Claimed, name: str, data: str) -> tuple[str, dict[str, Any]]:
        """The UPDATE that appends recovery point (name, data JSON) while ``claim`` owns the key."""
        sql = (
            f"UPDATE {self.table} "
            "SET phases = json_insert(phases, '$[#]', json_array(:name, :data)) "
            "WHERE key = :key AND token = :token AND state = 'in_flight'"
        )
        return sql, {"name": name, "data": data, "key": claim.key, "token": claim.token}

    def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        sql, params = self.complete_statement(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)
        with self._edge() as conn:
            return int(conn.execute(sql, params).rowcount) == 1

    def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        sql, params = self.phase_statement(claim, name, data)
        with self._edge() as conn:
            return int(conn.execute(sql, params).rowcount) == 1

    def release(self, claim: Claimed) -> bool:
        with self._edge() as conn:
            return self._release(conn, claim)

    def _release(self, conn: sqlite3.Connection, claim: Claimed) -> bool:
        cur = conn.execute(
            f"DELETE FROM {self.table} WHERE key = ? AND token = ? AND state = 'in_flight' "
            "AND phases = '[]'",
            (claim.key, claim.token),
        )
        if cur.rowcount == 1:
            return True
        # Recovery points were recorded: keep them, expire the lease so a retry takes over.
        now = self._clock()
        cur = conn.execute(
            f"UPDATE {self.table} SET lease_until = ?, expires_at = ? "
            "WHERE key = ? AND token = ? AND state = 'in_flight'",
            (now, now, claim.key, claim.token),
        )
        return cur.rowcount == 1

    def renew(self, claim: Claimed, *, lease: float) -> bool:
        with self._edge() as conn:
            return self._renew(conn, claim, lease=lease)

    def _renew(self, conn: sqlite3.Connection, claim: Claimed, *, lease: float) -> bool:
        lease_until = self._clock() + lease
        forget_at = lease_until + ABANDONED_RETENTION
        cur = conn.execute(
            f"UPDATE {self.table} SET lease_until = ?, expires_at = ?, forget_at = "
            "max(forget_at, ?) WHERE key = ? AND token = ? AND state = 'in_flight'",
            (lease_until, lease_until, forget_at, claim.key, claim.token),
        )
        return cur.rowcount == 1

    def _write_batch(self, ops: Sequence[_Write]) -> list[object]:
        """Run queued writes in queue order, in one write transaction (one commit).

        Claims answered by a read alone (repeats) come first without the write lock, as long as
        no write came before them; the first write takes the lock (BEGIN IMMEDIATE) and every op
        from there runs inside, each in a savepoint of its own, so one that fails fails alone.
        If the commit fails, every op inside gets StoreUnavailable: none is reported done.
        """
        results: list[object] = []
        with self._edge() as conn:
            at = 0
            while at < len(ops):
                read = ops[at].read
                answer = None if read is None else read(conn)
                if answer is None:
                    break
                results.append(answer)
                at += 1
            if at == len(ops):
                return results
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in ops[at:]:
                    conn.execute("SAVEPOINT op")
                    try:
                        answer = op.read(conn) if op.read is not None else None
                        results.append(op.write(conn) if answer is None else answer)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO op")
                        results.append(self._failed(exc))
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not isinstance(exc, Exception):
                    raise
                error = self._failed(exc)
                results[at:] = [error] * (len(ops) - at)
        return results

    def _failed(self, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, StoreUnavailable):
            return exc
        return StoreUnavailable(f"SQLite store {self.path!r} failed: {type(exc).__name__}: {exc}")

    def get(self, key: str) -> Record | None:
        with self._edge() as conn:
            row = conn.execute(self._get_sql, (key,)).fetchone()
        return None if row is None else _record(row)

    def purge(self, *, limit: int = 1000) -> int:
        with self._edge() as conn:
            return self._purge(conn, limit)

    def _purge(self, conn: sqlite3.Connection, limit: int) -> int:
        now = self._clock()
        cur = conn.execute(
            f"DELETE FROM {self.table} WHERE key IN "
            f"(SELECT key FROM {self.table} WHERE forget_at <= ? LIMIT ?)",
            (now, limit),
        )
        deleted = cur.rowcount
        # Past the replay window a completed record keeps only its fingerprint (a tombstone).
        conn.execute(
            f"UPDATE {self.table} SET response = NULL WHERE key IN (SELECT key FROM {self.table} "
            "WHERE state = 'completed' AND expires_at <= ? AND response IS NOT NULL LIMIT ?)",
            (now, limit),
        )
        return deleted

    def stats(self, *, limit: int = 20) -> StoreStats:
        """Records by state (one aggregate over the table), and the ``limit`` oldest leases.

        Cost: one scan of the table for the counts, in one read transaction with the lease
        query, so both see the same records; it takes no write lock.
        """
        t = self.table
        with self._edge() as conn:
            now = self._clock()
            conn.execute("BEGIN")
            try:
                counts = conn.execute(
                    "SELECT "
                    "coalesce(sum(forget_at > :now AND state = 'in_flight'), 0), "
                    "coalesce(sum(forget_at > :now AND state = 'completed' "
                    "AND expires_at > :now), 0), "
                    "coalesce(sum(forget_at > :now AND state = 'completed' "
                    "AND expires_at <= :now), 0), "
                    "coalesce(sum(forget_at <= :now), 0), "
                    "min(CASE WHEN forget_at > :now AND state = 'in_flight' "
                    f"THEN lease_until END) FROM {t}",
                    {"now": now},
                ).fetchone()
                keys = conn.execute(
                    f"SELECT key, attempt, lease_until, token FROM {t} "
                    "WHERE state = 'in_flight' AND forget_at > ? ORDER BY lease_until LIMIT ?",
                    (now, max(0, limit)),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        in_flight, completed, tombstones, expired, oldest = counts
        return StoreStats(
            in_flight=int(in_flight),
            completed=int(completed),
            tombstones=int(tombstones),
            expired=int(expired),
            oldest_lease_left=None if oldest is None else float(oldest) - now,
            in_flight_keys=tuple(
                in_flight_key(key, int(attempt), float(lease), token, now)
                for key, attempt, lease, token in keys
            ),
        )

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._local = threading.local()


class AsyncSQLiteStore(AsyncOverSync[SQLiteStore]):
    """The async side of :class:`SQLiteStore`: the same store, run on one worker thread.

    Takes the same arguments. Also a :class:`oncely.TransactionalStore`, as the sync side.
    """

    dialect = "sqlite"
    # Waits are bounded by busy_timeout; the driver needs no timer of its own around them.
    in_process = True

    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__(SQLiteStore(path, **options))
        self.path, self.table = self.sync.path, self.sync.table
        self._wait = self.sync._busy_ms / 1000 + 1  # busy_timeout, plus a second for the queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oncely-sqlite")
        # Writes queued while the worker runs a batch run together next, in one transaction.
        self._batcher: Batcher[_Write, object] = Batcher(self._send_writes, max_size=64)

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> AsyncSQLiteStore:
        return cls(_path_of(url), **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, table={self.table!r})"

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the worker thread, so the event loop never waits for the file lock.

        The wait is bounded here (busy_timeout, plus a second for the queue), so the driver
        needs no timer of its own around the call.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._wait):
                return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        except TimeoutError as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r} is locked by a writer") from exc
        except StoreUnavailable:
            raise
        except Exception as exc:  # an executor shut down ...
            raise StoreUnavailable(
                f"SQLite store {self.path!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _send_writes(self, ops: Sequence[_Write]) -> list[object]:
        return await self._call(self.sync._write_batch, ops)

    async def _write(self, op: _Write) -> Any:
        return await self._batcher.submit(op)

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        sync = self.sync
        result: Claimed | Existing = await self._write(
            _Write(
                lambda conn: sync._claim_write(conn, key, fingerprint, lease=lease),
                lambda conn: sync._claim_read(conn, key, fingerprint),
            )
        )
        return result

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        sql, params = self.complete_statement(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)
        return bool(await self._write(_Write(lambda conn: _one_row(conn, sql, params))))

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        sql, params = self.phase_statement(claim, name, data)
        return bool(await self._write(_Write(lambda conn: _one_row(conn, sql, params))))

    async def release(self, claim: Claimed) -> bool:
        sync = self.sync
        return bool(await self._write(_Write(lambda conn: sync._release(conn, claim))))

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        sync = self.sync
        return bool(await self._write(_Write(lambda conn: sync._renew(conn, claim, lease=lease))))

    def complete_statement(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> tuple[str, dict[str, Any]]:
        """The completing UPDATE, for this store or for a handler's own transaction."""
        return self.sync.complete_statement(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)

    def phase_statement(self, claim: Claimed, name: str, data: str) -> tuple[str, dict[str, Any]]:
        """The UPDATE that appends recovery point (name, data JSON) while ``claim`` owns the key."""
        return self.sync.phase_statement(claim, name, data)

    async def migrate(self) -> None:
        """Create the table and its index now (they are also created on first use)."""
        await self._call(self.sync.migrate)

    async def aclose(self) -> None:
        await self._call(self.sync.close)
        self._executor.shutdown(wait=False)
