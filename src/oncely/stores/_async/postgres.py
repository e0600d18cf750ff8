"""The PostgreSQL store's driver, async side: psycopg's AsyncConnection and AsyncConnectionPool.

``stores/_sync/postgres.py`` is generated from ``stores/_async/postgres.py`` by
``scripts/unasync.py``: only the async file is edited by hand. The statements are those of
``stores/_postgres_sql.py``; see ``oncely/stores/postgres.py`` for the store as a whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from ..._codec import Claimed, Existing, Record, StoredResponse, encode_response
from ..._errors import ConfigurationError, StoreUnavailable
from ...events import StoreStats
from .._postgres_sql import (
    CLAIM_TRIES,
    PURGE_BATCH,
    claim_batch_params,
    claim_params,
    claim_result,
    record_from_row,
    render_statements,
    render_stats,
    take_query_option,
    threshold_from_text,
)
from .._rules import ABANDONED_RETENTION, new_token
from .._stats import in_flight_key
from ._io import Batcher, Lock, promptly

__all__ = ["AsyncPostgresStore"]

# Times a batch is sent when the server rolls it back for a deadlock with another transaction.
BATCH_TRIES = 3

ConfigureCallback = Callable[["psycopg.AsyncConnection[Any]"], Awaitable[None]]


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


@dataclass(frozen=True, slots=True)
class _Op:
    """One store write, queued for the next round trip: its kind, its key, and the parameters
    of its single statement (a claim's proposed token is ``params["token"]``)."""

    kind: str  # "claim", "complete", "release", "renew" or "phase"
    key: str
    params: dict[str, Any]


def _segments(ops: Sequence[_Op]) -> list[list[int]]:
    """The indexes of ``ops`` cut into runs, in queue order, in which no key comes twice: a new
    run starts where a key of the current one comes again. Within a run the operations touch
    different rows, so they commute and may go out as one statement per kind."""
    runs: list[list[int]] = []
    keys: set[str] = set()
    for i, op in enumerate(ops):
        if not runs or op.key in keys:
            runs.append([])
            keys = set()
        runs[-1].append(i)
        keys.add(op.key)
    return runs


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
        self._lock = Lock()
        # Writes queued while a round trip is out go out together next, in one transaction.
        self._batcher: Batcher[_Op, object] = Batcher(
            self._send_ops, max_size=64, lanes=min(4, max_size)
        )

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> AsyncPostgresStore:
        """A store for ``url``; ``prepare_threshold`` may be in its query (an option given here
        wins), and is read from text as ``none`` or a count."""
        url, in_url = take_query_option(url, "prepare_threshold")
        if in_url is not None:
            options.setdefault("prepare_threshold", in_url)
        threshold = options.get("prepare_threshold")
        if isinstance(threshold, str):
            options["prepare_threshold"] = threshold_from_text(threshold)
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
                except PoolTimeout as exc:
                    await pool.close()
                    raise await self._why(exc) from exc
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            if not self._ready:
                async with self._pool.connection() as conn:
                    await self._migrate(conn, only_if_missing=True)
                self._ready = True
            return self._pool

    async def _why(self, timed_out: PoolTimeout) -> BaseException:
        """What one direct connection says when the pool only says it timed out: the server's
        own words (no such database or role, a refused port) tell what to fix."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
        except psycopg.Error as exc:
            return exc
        await conn.close()
        return timed_out

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            pool = self._pool if self._ready and self._pool is not None else await self._open()
            async with pool.connection() as conn:
                yield conn
        except Exception as exc:  # see _unavailable: any failure of the driver or the pool
            raise self._unavailable(exc) from exc

    def _names(self) -> dict[str, str]:
        """What the statement that finds the schema, table and indexes asks for."""
        s = self.statements
        return {
            "schema": s.schema,
            "table": s.table,
            "forget_index": s.forget_index,
            "strip_index": s.strip_index,
        }

    async def _migrate(self, conn: psycopg.AsyncConnection[Any], *, only_if_missing: bool) -> None:
        s = self.statements
        names = self._names()
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

    async def exists(self) -> bool:
        """Whether the store's schema and table are there, asked on a connection of its own:
        unlike every other call, it never creates them (what a read-only tool asks first)."""
        s = self.statements
        names = self._names()
        try:
            async with await psycopg.AsyncConnection.connect(
                self._conninfo, **self._kwargs
            ) as conn:
                cur = await conn.execute(s.existing, names, prepare=False)
                row = await cur.fetchone()
        except Exception as exc:  # see _unavailable
            raise self._unavailable(exc) from exc
        return row is not None and bool(row[0]) and bool(row[1])

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
        row: tuple[Any, ...] | None = await promptly(self._run(query, params, rows=True))
        return row

    async def _rowcount(self, query: str, params: Mapping[str, Any]) -> int:
        count: int = await promptly(self._run(query, params, rows=False))
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

    # The store writes. Each is one statement when it goes out alone; writes queued while a
    # round trip is out go out together in the next (see _send_batch).

    async def _submit(self, op: _Op) -> Any:
        if not self._ready:
            await self._connect()
        return await self._batcher.submit(op)

    async def _connect(self) -> None:
        try:
            await self._open()
        except Exception as exc:  # see _unavailable: any failure of the driver or the pool
            raise self._unavailable(exc) from exc

    def _token(self) -> str:
        """A new fencing token, its claim's time on the store's clock (this machine's clock,
        moved by ``time_offset`` as the server's is), which a lease's age is read from."""
        return new_token(time.time() + self.time_offset)

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        params = claim_params(key, fingerprint, self._token(), lease=lease, offset=self.time_offset)
        result: Claimed | Existing = await self._submit(_Op("claim", key, params))
        return result

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        _, params = self.complete_statement(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)
        return bool(await self._submit(_Op("complete", claim.key, params)))

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        _, params = self.phase_statement(claim, name, data)
        return bool(await self._submit(_Op("phase", claim.key, params)))

    async def release(self, claim: Claimed) -> bool:
        params = {"key": claim.key, "token": claim.token, "offset": float(self.time_offset)}
        return bool(await self._submit(_Op("release", claim.key, params)))

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        params = {
            "key": claim.key,
            "token": claim.token,
            "lease": float(lease),
            "retention": ABANDONED_RETENTION,
            "offset": float(self.time_offset),
        }
        return bool(await self._submit(_Op("renew", claim.key, params)))

    async def _send_ops(self, ops: Sequence[_Op]) -> list[object]:
        """The answers to queued writes, in order: one alone is its own statement, as it always
        was; more go out as one batch."""
        if len(ops) == 1:
            try:
                return [await self._alone(ops[0])]
            except StoreUnavailable as exc:
                return [exc]
        try:
            for _ in range(BATCH_TRIES - 1):
                try:
                    return await self._send_batch(ops)
                except psycopg.errors.DeadlockDetected:
                    # Two batches (of two processes) waited for each other's rows; the server
                    # rolled this one back whole, so nothing of it was applied: send it again.
                    continue
            return await self._send_batch(ops)
        except Exception as exc:  # see _unavailable: any failure of the driver or the pool
            raise self._unavailable(exc) from exc

    async def _alone(self, op: _Op) -> object:
        s, params = self.statements, op.params
        if op.kind == "claim":
            return await self._claim_alone(params)
        if op.kind == "release":
            row = await self._fetchone(s.release, params)
            return row is not None and row[0] == 1
        query = {"complete": s.complete, "renew": s.renew, "phase": s.record_phase}[op.kind]
        return await self._rowcount(query, params) == 1

    async def _claim_alone(self, params: dict[str, Any], tries: int = CLAIM_TRIES) -> object:
        token = params["token"]
        for _ in range(tries):
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

    async def _send_batch(self, ops: Sequence[_Op]) -> list[object]:
        """Queued writes in one transaction, sent in one round trip (psycopg's pipeline mode):
        BEGIN, then for each run of distinct keys (_segments, in queue order) one statement for
        its claims, one for its completes and one each for the rest, then COMMIT.

        Each row is decided by the same rule and fencing token as alone, and a later run sees
        what an earlier one wrote, so conflicting writes for one key answer as they would one
        after another in queue order. When anything fails (a statement, the commit, the
        connection), the transaction is rolled back, or its outcome unknown, and the caller fails
        every member with StoreUnavailable: none is reported done. A claim whose row was
        decided by a claim committed after the statement's snapshot (no row) runs again alone.
        """
        s = self.statements
        offset = float(self.time_offset)
        pool = self._pool if self._ready and self._pool is not None else await self._open()
        conn = await pool.getconn()
        try:
            reads: list[tuple[str, list[int], psycopg.AsyncCursor[Any]]] = []
            try:
                async with conn.pipeline():
                    await conn.execute("BEGIN")
                    for run in _segments(ops):
                        claims = [i for i in run if ops[i].kind == "claim"]
                        completes = [i for i in run if ops[i].kind == "complete"]
                        if claims:
                            cur = await conn.execute(
                                s.claim_batch,
                                claim_batch_params([ops[i].params for i in claims], offset=offset),
                                binary=True,
                            )
                            reads.append(("claim", claims, cur))
                        if completes:
                            p = [ops[i].params for i in completes]
                            cur = await conn.execute(
                                s.complete_batch,
                                {
                                    "keys": [q["key"] for q in p],
                                    "tokens": [q["token"] for q in p],
                                    "responses": [q["response"] for q in p],
                                    "ttls": [q["ttl"] for q in p],
                                    "tombstone_ttls": [q["tombstone_ttl"] for q in p],
                                    "offset": offset,
                                },
                                binary=True,
                            )
                            reads.append(("complete", completes, cur))
                        for i in run:
                            kind = ops[i].kind
                            if kind in ("claim", "complete"):
                                continue
                            query = {"release": s.release, "renew": s.renew}.get(
                                kind, s.record_phase
                            )
                            cur = await conn.execute(query, ops[i].params, binary=True)
                            reads.append((kind, [i], cur))
                    await conn.execute("COMMIT")
            except BaseException:
                await self._roll_back(conn)
                raise
            results: list[object] = [None] * len(ops)
            for kind, members, cur in reads:
                if kind == "claim":
                    for row in await cur.fetchall():
                        i = members[int(row[11]) - 1]
                        results[i] = claim_result(row[:11], ops[i].params["token"])
                elif kind == "complete":
                    done = {int(n) for (n,) in await cur.fetchall()}
                    for n, i in enumerate(members, 1):
                        results[i] = n in done
                elif kind == "release":
                    count = await cur.fetchone()
                    results[members[0]] = count is not None and count[0] == 1
                else:
                    results[members[0]] = cur.rowcount == 1
        finally:
            await pool.putconn(conn)
        for i, result in enumerate(results):
            if result is None:  # a claim beaten after its snapshot: once more, alone
                try:
                    results[i] = await self._claim_alone(ops[i].params, CLAIM_TRIES - 1)
                except StoreUnavailable as exc:
                    results[i] = exc
        return results

    async def _roll_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Leave ``conn`` out of the failed batch's transaction, or closed (the pool drops it)."""
        try:
            idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if not conn.closed and not idle:
                await conn.execute("ROLLBACK")
        except Exception:
            await conn.close()

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

    async def stats(self, *, limit: int = 20) -> StoreStats:
        """Records by state and the ``limit`` oldest leases, in one statement (one sequential
        scan of the table; a read that takes no row lock)."""
        params = {"limit": max(0, limit), "offset": float(self.time_offset)}
        row = await self._fetchone(render_stats(self.schema, self.table), params)
        assert row is not None  # an aggregate without GROUP BY always answers one row
        in_flight, completed, tombstones, expired, oldest, now, keys, attempts, leases, tokens = row
        return StoreStats(
            in_flight=int(in_flight),
            completed=int(completed),
            tombstones=int(tombstones),
            expired=int(expired),
            oldest_lease_left=None if oldest is None else float(oldest) - float(now),
            in_flight_keys=tuple(
                in_flight_key(key, int(attempt), float(lease), token, float(now))
                for key, attempt, lease, token in zip(
                    keys or (), attempts or (), leases or (), tokens or (), strict=True
                )
            ),
        )

    async def aclose(self) -> None:
        async with self._lock:
            pool, self._pool, self._ready = self._pool, None, False
        if pool is not None:
            await pool.close()
