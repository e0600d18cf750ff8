"""Exactly-once effects: atomic phases and recovery points in the business transaction.

A stored response is not enough: if the process dies after the business transaction commits but
before the response is stored, a retry would run again. So a handler may move the request's
idempotency record forward in the SAME database transaction as its own writes:

    attempt = current_attempt()                       # the request being run, behind the middleware
    if not attempt.done("payment_created"):
        with conn:                                    # your transaction (sqlite3 here)
            payment_id = insert_payment(conn, ...)
            attempt.record(conn, "payment_created", {"id": payment_id})   # same transaction
    payment_id = attempt.data("payment_created")["id"]
    result = card_network.charge(..., idempotency_key=attempt.downstream_key("charge"))
    with conn:
        mark_payment(conn, payment_id, result)
        attempt.complete(conn, 201, headers, body)    # the response, committed with the effect
    return Response(body, 201, headers)

Crash windows, and what a retry (after the lease, or after an error released the key) does:

    client        handler                         database                     card network
      │──POST────►│ claim (attempt 1)                 │                              │
      │           │── tx: insert + record ───────────►│ payment + "payment_created"  │
      │           ✗ crash here: retry resumes at the charge, the payment row is reused
      │           │── charge(downstream key K) ───────────────────────────────────►│ charged once
      │           ✗ crash here: retry charges again with K; the network answers the same charge
      │           │── tx: mark + complete ───────────►│ status + stored response     │
      │           ✗ crash here: the response was committed with the effect; a retry replays it
      │◄──201─────│                                   │                              │

Recovery points survive a crash, a release (5xx, exception) and a lease takeover; they are
visible to the next attempt as ``attempt.phases``. ``downstream_key(step)`` is stable for the
request across attempts, so a resumed request cannot charge twice downstream either.

Which guarantee remains without a shared transaction: with a store in another database than the
business writes (Redis, say), ``checkpoint`` records a recovery point in its own round trip after
your commit. A crash between the two re-runs that phase on retry, so each phase must then be
idempotent by itself (use ``downstream_key``, unique constraints). The response is stored after
the handler returns, so a crash between your commit and that store also re-runs the request.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload, runtime_checkable

from ._codec import Claimed, StoredResponse
from ._drive import adrive, drive
from ._errors import ConfigurationError, OncelyError
from ._flow import Complete, Lease, Policy, RecordPhase, write_while_owned
from .stores import AsyncStore, Store

if TYPE_CHECKING:
    from ._observe import Watch

_perf_counter = time.perf_counter  # the watch's clock for store operations

__all__ = [
    "Attempt",
    "LeaseLost",
    "TransactionalStore",
    "current_attempt",
    "running",
]


class LeaseLost(OncelyError):
    """This attempt no longer owns its key (its lease was taken over): roll back, do nothing.

    Raised inside your transaction by ``record``/``complete``; let it propagate so the transaction
    rolls back and the new owner's work stands alone.
    """


@runtime_checkable
class TransactionalStore(Protocol):
    """A store whose records live in a database the handler's own connection can write to.

    Statements come back with the store's dialect and parameter style; the attempt runs them on
    the caller's connection, inside the caller's transaction.
    """

    dialect: str

    def phase_statement(self, claim: Claimed, name: str, data: str) -> tuple[str, Any]: ...

    def complete_statement(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> tuple[str, Any]: ...


_current: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "oncely_attempt", default=None
)


@overload
def current_attempt() -> Attempt: ...
@overload
def current_attempt(*, required: Literal[True]) -> Attempt: ...
@overload
def current_attempt(*, required: bool) -> Attempt | None: ...


def current_attempt(*, required: bool = True) -> Attempt | None:
    """The idempotent request this code runs for.

    Outside of one (no middleware, or a request without a key on a route where it is optional):
    ConfigurationError, or None with ``required=False``.
    """
    attempt = _current.get()
    if attempt is None and required:
        raise ConfigurationError(
            "no idempotent request is running here: call current_attempt() inside a handler "
            "behind oncely's middleware, for a request that carried an Idempotency-Key"
        )
    return attempt


def _statement(conn: Any, dialect: str, sql: str) -> Any:
    """``sql`` as ``conn`` takes it: DB-API text, or SQLAlchemy ``text()`` with ``:name``
    parameters; refuses a connection to another kind of database than the store's."""
    module = type(conn).__module__
    if module.startswith("sqlalchemy"):
        from sqlalchemy import text

        # Connections know their dialect; sessions through their bind.
        bound = conn.dialect if hasattr(conn, "dialect") else conn.get_bind().dialect
        if bound.name != dialect:
            raise ConfigurationError(
                f"this connection is to {bound.name}, but the idempotency store is {dialect}"
            )
        return text(sql if dialect == "sqlite" else sql.replace("%(", ":").replace(")s", ""))
    if dialect == "sqlite" and not module.startswith("sqlite3"):
        raise ConfigurationError("the idempotency store is SQLite: pass a sqlite3 connection")
    if dialect == "postgresql" and not module.startswith("psycopg"):
        raise ConfigurationError("the idempotency store is PostgreSQL: pass a psycopg connection")
    return sql


def _executed(conn: Any, statement: Any, params: Any) -> tuple[float, Any]:
    """When ``statement`` began on ``conn``, and its cursor or the exception it raised."""
    began = _perf_counter()
    try:
        return began, conn.execute(statement, params)
    except Exception as exc:
        return began, exc


async def _aexecuted(conn: Any, statement: Any, params: Any) -> tuple[float, Any]:
    """:func:`_executed` on an async connection."""
    began = _perf_counter()
    try:
        return began, await conn.execute(statement, params)
    except Exception as exc:
        return began, exc


class Attempt:
    """One run of an idempotent request: its recovery points and its way to move them forward."""

    def __init__(
        self,
        store: Any,
        claim: Claimed,
        *,
        ttl: float,
        tombstone_ttl: float,
        header_allowlist: frozenset[str],
        lease: Lease | None = None,
        store_timeout: float = 5.0,
        watch: Watch | None = None,
    ) -> None:
        self._store = store
        self._claim = claim
        # The request's watch, told of each write made in the app's own transaction, as of
        # the writes oncely makes itself (their time, and the size of a response kept).
        self._watch = watch
        # With the driver's lease, a checkpoint that meets a store blip is tried again while
        # the lease holds: its phase has committed, and losing the point would re-run it.
        self._lease, self._store_timeout = lease, store_timeout
        self._ttl, self._tombstone_ttl = ttl, tombstone_ttl
        self._allowlist = header_allowlist
        self._phases: dict[str, Any] = (
            {name: json.loads(data) for name, data in claim.phases} if claim.phases else {}
        )
        self.completed = False

    @property
    def key(self) -> str:
        """The storage key: opaque, stable for (tenant, Idempotency-Key)."""
        return self._claim.key

    @property
    def number(self) -> int:
        """1 on the first run; 2 and up when resumed after a crash, an error or a takeover."""
        return self._claim.attempt

    @property
    def phases(self) -> Mapping[str, Any]:
        """The recovery points reached so far, by name, with their data."""
        return dict(self._phases)

    def done(self, name: str) -> bool:
        return name in self._phases

    def data(self, name: str) -> Any:
        return self._phases[name]

    def downstream_key(self, step: str) -> str:
        """An idempotency key for a foreign call: stable for this request and step, per tenant."""
        digest = hashlib.sha256(f"{self._claim.key}\0{step}".encode()).hexdigest()
        return f"oncely-{digest[:40]}"

    def _transactional(self) -> TransactionalStore:
        if not isinstance(self._store, TransactionalStore):
            raise ConfigurationError(
                "this store cannot share your database transaction (only SQL stores can): use "
                "await attempt.checkpoint(name, data), which records the recovery point after "
                "your commit; a crash between the two re-runs that phase"
            )
        return self._store

    def _encode(self, name: str, data: Any) -> str:
        if name in self._phases:
            raise ConfigurationError(f"recovery point {name!r} was already recorded")
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    def _response(
        self, status: int, headers: Iterable[tuple[str, str]], body: bytes
    ) -> StoredResponse:
        kept = tuple((k.lower(), v) for k, v in headers if k.lower() in self._allowlist)
        return StoredResponse(status=status, headers=kept, body=body)

    def _phase(self, conn: Any, name: str, data: Any) -> tuple[Any, Any, str, RecordPhase]:
        """(statement, parameters, data JSON, the write) recording ``name`` on ``conn``."""
        store = self._transactional()
        encoded = self._encode(name, data)
        sql, params = store.phase_statement(self._claim, name, encoded)
        write = RecordPhase(self._claim, name, encoded)
        return _statement(conn, store.dialect, sql), params, encoded, write

    def _completion(
        self, conn: Any, status: int, headers: Iterable[tuple[str, str]], body: bytes
    ) -> tuple[Any, Any, Complete]:
        """(statement, parameters, the write) storing this response on ``conn``."""
        store = self._transactional()
        write = Complete(
            self._claim, self._response(status, headers, body), self._ttl, self._tombstone_ttl
        )
        sql, params = store.complete_statement(
            write.claim, write.response, ttl=write.ttl, tombstone_ttl=write.tombstone_ttl
        )
        return _statement(conn, store.dialect, sql), params, write

    def _owned(self, write: Complete | RecordPhase, began: float, result: Any) -> None:
        """Tell the watch how the statement of ``write`` went (``result``: its cursor, or the
        exception it raised), then raise that exception, or LeaseLost if the key was taken
        over (the statement changed no row)."""
        owned = not isinstance(result, Exception) and result.rowcount == 1
        if self._watch is not None:
            self._watch.operation(write, began, result if isinstance(result, Exception) else owned)
        if isinstance(result, Exception):
            raise result
        if not owned:
            raise LeaseLost(f"key {self.key} was taken over; roll back this transaction")

    def record(self, conn: Any, name: str, data: Any = None) -> None:
        """Record recovery point ``name`` on ``conn``, inside your open transaction."""
        statement, params, encoded, write = self._phase(conn, name, data)
        self._owned(write, *_executed(conn, statement, params))
        self._phases[name] = json.loads(encoded)

    async def arecord(self, conn: Any, name: str, data: Any = None) -> None:
        """``record`` for an async connection (psycopg AsyncConnection, SQLAlchemy AsyncSession)."""
        statement, params, encoded, write = self._phase(conn, name, data)
        self._owned(write, *(await _aexecuted(conn, statement, params)))
        self._phases[name] = json.loads(encoded)

    def complete(
        self, conn: Any, status: int, headers: Iterable[tuple[str, str]], body: bytes
    ) -> None:
        """Store the response on ``conn``, in the transaction that commits the effect.

        Return exactly this status, these headers and this body from the handler.
        """
        statement, params, write = self._completion(conn, status, headers, body)
        self._owned(write, *_executed(conn, statement, params))
        self.completed = True

    async def acomplete(
        self, conn: Any, status: int, headers: Iterable[tuple[str, str]], body: bytes
    ) -> None:
        """``complete`` for an async connection."""
        statement, params, write = self._completion(conn, status, headers, body)
        self._owned(write, *(await _aexecuted(conn, statement, params)))
        self.completed = True

    async def checkpoint(self, name: str, data: Any = None) -> None:
        """Record a recovery point in the store's own round trip (any store; no shared tx)."""
        encoded = self._encode(name, data)
        store: AsyncStore = self._store
        owned: object
        if self._lease is None:
            owned = await store.record_phase(self._claim, name, encoded)
        else:
            write = write_while_owned(
                RecordPhase(self._claim, name, encoded),
                self._lease,
                what=f"recovery point {name!r}",
            )
            owned = await adrive(write, store, store_timeout=self._store_timeout)
        if not owned:
            raise LeaseLost(f"key {self.key} was taken over")
        self._phases[name] = json.loads(encoded)

    def checkpoint_sync(self, name: str, data: Any = None) -> None:
        """:meth:`checkpoint` for a sync store (the WSGI middleware, a sync ``@idempotent``):
        the recovery point in the store's own round trip, retried while the lease holds."""
        encoded = self._encode(name, data)
        store: Store = self._store
        if inspect.iscoroutinefunction(store.record_phase):
            raise ConfigurationError(
                "this attempt runs on an async store: use await attempt.checkpoint(name, data)"
            )
        owned: object
        if self._lease is None:
            owned = store.record_phase(self._claim, name, encoded)
        else:
            write = write_while_owned(
                RecordPhase(self._claim, name, encoded),
                self._lease,
                what=f"recovery point {name!r}",
            )
            owned = drive(write, store)
        if not owned:
            raise LeaseLost(f"key {self.key} was taken over")
        self._phases[name] = json.loads(encoded)


class running:  # used as a function: ``with running(...) as attempt``
    """The attempt of ``claim`` as :func:`current_attempt` while the app runs (None: the app
    runs unprotected, with no attempt).

    A class, not a generator in ``contextlib.contextmanager``: it is entered once per request.
    """

    __slots__ = ("_attempt", "_reset")

    def __init__(
        self,
        store: Any,
        claim: Claimed | None,
        lease: Lease | None,
        policy: Policy,
        header_allowlist: frozenset[str],
        watch: Watch | None = None,
    ) -> None:
        self._attempt = (
            None
            if claim is None
            else Attempt(
                store,
                claim,
                ttl=policy.ttl,
                tombstone_ttl=policy.tombstone_ttl,
                header_allowlist=header_allowlist,
                lease=lease,
                store_timeout=policy.store_timeout,
                watch=watch,
            )
        )

    def __enter__(self) -> Attempt | None:
        self._reset = _current.set(self._attempt)
        return self._attempt

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._reset)
