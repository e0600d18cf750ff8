"""Atomic phases and recovery points on SQLite: effects commit with their recovery point."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from oncely import (
    Attempt,
    Claimed,
    ConfigurationError,
    LeaseLost,
    State,
    current_attempt,
    single_tenant,
    storage_key,
)
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import AsyncMemoryStore
from oncely.stores.sqlite import AsyncSQLiteStore

from .conftest import Clock


class Bank:
    """A handler that creates a payment in one phase and completes in another.

    ``fail_after_phase`` makes the first attempt raise after its first phase committed, as a
    crash between phases would leave it.
    """

    def __init__(self, db: Path) -> None:
        self.db = db
        self.fail_after_phase = 0
        self.runs = 0
        self.attempts: list[int] = []
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, state TEXT)")
        conn.close()

    def count(self) -> int:
        with sqlite3.connect(self.db) as conn:
            (n,) = conn.execute("SELECT count(*) FROM payments").fetchone()
        conn.close()
        return int(n)

    async def create(self, request: Request) -> Response:
        self.runs += 1
        attempt = current_attempt()
        self.attempts.append(attempt.number)
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            if not attempt.done("created"):
                conn.execute("BEGIN IMMEDIATE")
                payment_id = f"pay_{uuid.uuid4().hex[:8]}"
                conn.execute("INSERT INTO payments VALUES (?, 'pending')", (payment_id,))
                attempt.record(conn, "created", {"id": payment_id})
                conn.execute("COMMIT")
            payment_id = attempt.data("created")["id"]
            if self.fail_after_phase:
                self.fail_after_phase -= 1
                raise RuntimeError("crash between phases")
            body = json.dumps({"id": payment_id, "status": "succeeded"}).encode()
            headers = [("content-type", "application/json"), ("location", f"/p/{payment_id}")]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE payments SET state = 'succeeded' WHERE id = ?", (payment_id,))
            attempt.complete(conn, 201, headers, body)
            conn.execute("COMMIT")
            return Response(body, 201, headers=dict(headers))
        finally:
            conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[AsyncSQLiteStore]:
    s = AsyncSQLiteStore(db)
    yield s
    await s.aclose()


def client_for(app: IdempotencyMiddleware) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def make_app(bank: Bank, store: AsyncSQLiteStore) -> IdempotencyMiddleware:
    inner = Starlette(routes=[Route("/payments", bank.create, methods=["POST"])])
    return IdempotencyMiddleware(inner, store=store, tenant=single_tenant)


async def test_the_response_committed_with_the_effect_is_replayed(
    db: Path, store: AsyncSQLiteStore
) -> None:
    """The handler stores its response in its own transaction; a repeat replays it."""
    bank = Bank(db)
    async with client_for(make_app(bank, store)) as client:
        h = {"Idempotency-Key": "k1"}
        first = await client.post("/payments", json={"amount": 1}, headers=h)
        second = await client.post("/payments", json={"amount": 1}, headers=h)
    assert first.status_code == 201
    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert bank.runs == 1
    assert bank.count() == 1


async def test_a_retry_after_a_failure_between_phases_resumes_from_the_recovery_point(
    db: Path, store: AsyncSQLiteStore
) -> None:
    """The first attempt committed its payment and then failed; the retry reuses that payment."""
    bank = Bank(db)
    bank.fail_after_phase = 1
    app = make_app(bank, store)
    async with client_for(app) as client:
        h = {"Idempotency-Key": "k2"}
        with pytest.raises(RuntimeError, match="crash between phases"):
            await client.post("/payments", json={"amount": 1}, headers=h)
        record = await store.get(storage_key("single-tenant", "k2"))
        assert record is not None
        assert record.state is State.IN_FLIGHT
        assert [name for name, _ in record.phases] == ["created"]
        retry = await client.post("/payments", json={"amount": 1}, headers=h)
    assert retry.status_code == 201
    assert bank.attempts == [1, 2]
    assert bank.count() == 1
    payment_id = json.loads(record.phases[0][1])["id"]
    assert retry.json()["id"] == payment_id


async def test_a_taken_over_attempt_cannot_record_and_its_transaction_rolls_back(
    db: Path, tmp_path: Path
) -> None:
    """Fencing reaches into the business transaction: a zombie's phase raises LeaseLost."""
    clock = Clock()
    store = AsyncSQLiteStore(db, clock=clock)
    try:
        zombie = await store.claim("key", "fp", lease=10)
        assert isinstance(zombie, Claimed)
        clock.advance(11)
        owner = await store.claim("key", "fp", lease=10)
        assert isinstance(owner, Claimed)

        attempt = Attempt(store, zombie, ttl=100, tombstone_ttl=100, header_allowlist=frozenset())
        Bank(db)
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO payments VALUES ('pay_zombie', 'pending')")
        with pytest.raises(LeaseLost):
            attempt.record(conn, "created", {"id": "pay_zombie"})
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM payments").fetchone() == (0,)
        conn.close()
        record = await store.get("key")
        assert record is not None
        assert record.token == owner.token
        assert record.phases == ()
    finally:
        await store.aclose()


def test_downstream_keys_are_stable_across_attempts_and_differ_by_step() -> None:
    a1 = Claimed("k", "fp", "t1", 1, 0.0)
    a2 = Claimed("k", "fp", "t2", 2, 0.0)
    other = Claimed("k2", "fp", "t3", 1, 0.0)

    def make(claim: Claimed) -> Attempt:
        return Attempt(
            AsyncMemoryStore(), claim, ttl=1, tombstone_ttl=1, header_allowlist=frozenset()
        )

    assert make(a1).downstream_key("charge") == make(a2).downstream_key("charge")
    assert make(a1).downstream_key("charge") != make(a1).downstream_key("refund")
    assert make(a1).downstream_key("charge") != make(other).downstream_key("charge")


async def test_a_store_that_cannot_share_the_transaction_says_so() -> None:
    """Memory (like Redis) has no shared transaction: record() explains checkpoint() instead."""

    store = AsyncMemoryStore()
    claim = await store.claim("k", "fp", lease=10)
    assert isinstance(claim, Claimed)
    attempt = Attempt(store, claim, ttl=1, tombstone_ttl=1, header_allowlist=frozenset())
    conn = sqlite3.connect(":memory:")
    with pytest.raises(ConfigurationError, match="checkpoint"):
        attempt.record(conn, "created", {})
    conn.close()
    await attempt.checkpoint("created", {"id": 1})
    again = await store.get("k")
    assert again is not None
    assert again.phases == (("created", '{"id":1}'),)


@pytest.fixture
def engine_session(db: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{db}")
    with Session(engine) as session:
        yield session
    engine.dispose()


async def test_sqlalchemy_sessions_record_phases_in_their_transaction(
    db: Path, store: AsyncSQLiteStore, engine_session: Session
) -> None:
    """The SQLAlchemy recipe: attempt.record(session, ...) inside session.begin()."""

    claim = await store.claim("sa-key", "fp", lease=10)
    assert isinstance(claim, Claimed)
    attempt = Attempt(store, claim, ttl=10, tombstone_ttl=10, header_allowlist=frozenset())
    Bank(db)
    with engine_session.begin():
        engine_session.execute(sql_text("INSERT INTO payments VALUES ('pay_sa', 'pending')"))
        attempt.record(engine_session, "created", {"id": "pay_sa"})
    record = await store.get("sa-key")
    assert record is not None
    assert record.phases == (("created", '{"id":"pay_sa"}'),)

    def failing_transaction() -> None:
        with engine_session.begin():
            engine_session.execute(sql_text("INSERT INTO payments VALUES ('pay_2', 'pending')"))
            attempt.record(engine_session, "second", {"id": "pay_2"})
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        failing_transaction()
    record = await store.get("sa-key")
    assert record is not None
    assert [name for name, _ in record.phases] == ["created"]


def test_outside_an_idempotent_request_there_is_no_attempt() -> None:
    """current_attempt() refuses, or answers None when asked with required=False."""
    with pytest.raises(ConfigurationError, match="no idempotent request"):
        current_attempt()
    assert current_attempt(required=False) is None


async def test_a_response_committed_with_the_effect_is_reported_with_its_size(
    db: Path, store: AsyncSQLiteStore
) -> None:
    """The decision and the size histogram count the response the app kept itself, as they
    count one oncely kept: by hook (a full decision) and by Metrics alone (its fast path)."""
    from prometheus_client import CollectorRegistry

    from oncely.events import Decision
    from oncely.metrics import Metrics

    bank = Bank(db)
    inner = Starlette(routes=[Route("/payments", bank.create, methods=["POST"])])
    events: list[Decision] = []
    registry = CollectorRegistry()
    by_hook = IdempotencyMiddleware(
        inner, store=store, tenant=single_tenant, on_decision=events.append
    )
    by_metrics = IdempotencyMiddleware(
        inner, store=store, tenant=single_tenant, on_decision=Metrics(registry=registry)
    )
    async with client_for(by_hook) as client:
        first = await client.post("/payments", json={"a": 1}, headers={"Idempotency-Key": "k1"})
    async with client_for(by_metrics) as client:
        await client.post("/payments", json={"a": 1}, headers={"Idempotency-Key": "k2"})
    assert [(e.outcome, e.response_size) for e in events] == [("executed", len(first.content))]
    labels = {"surface": "asgi"}
    assert registry.get_sample_value("oncely_stored_response_size_bytes_count", labels) == 1.0
    # The app's own writes are timed as oncely's are: the claim, then the recovery point and
    # the response written in the app's transactions.
    assert [(op.name, op.failed) for op in events[0].operations] == [
        ("claim", False),
        ("record_phase", False),
        ("complete", False),
    ]
    assert events[0].store_seconds >= sum(op.seconds for op in events[0].operations) * 0.99
    for operation in ("claim", "record_phase", "complete"):
        timed = {"store": "sqlite", "operation": operation}
        count = "oncely_store_operation_duration_seconds_count"
        assert registry.get_sample_value(count, timed) == 1.0, operation


async def test_a_write_in_the_apps_transaction_that_fails_is_timed_as_failed(
    db: Path, store: AsyncSQLiteStore
) -> None:
    """A recovery point whose statement raises (a locked database, a closed connection) is a
    failed store operation in the decision, and the app sees the error itself."""
    from oncely.events import Decision

    async def broken(request: Request) -> Response:
        conn = sqlite3.connect(db)
        conn.close()  # a closed connection: its execute raises
        try:
            current_attempt().record(conn, "created", {"id": "p"})
        except sqlite3.ProgrammingError:
            return Response(b"{}", 503)
        return Response(b"{}", 201)

    events: list[Decision] = []
    app = IdempotencyMiddleware(
        Starlette(routes=[Route("/payments", broken, methods=["POST"])]),
        store=store,
        tenant=single_tenant,
        on_decision=events.append,
    )
    async with client_for(app) as client:
        answer = await client.post("/payments", json={}, headers={"Idempotency-Key": "k1"})
    assert answer.status_code == 503
    (event,) = events
    assert [(op.name, op.failed) for op in event.operations][:2] == [
        ("claim", False),
        ("record_phase", True),
    ]
