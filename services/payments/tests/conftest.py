"""Fixtures: the service in-process (httpx.ASGITransport), on a fresh database per test.

Every test that takes ``settings`` runs three times: on a SQLite file (the default), on
PostgreSQL (127.0.0.1:5432, database ``test``, a schema of its own, dropped afterwards), and with
the idempotency store on Redis (127.0.0.1:6379, a key prefix of its own, deleted afterwards) and
the ledger apart from it in a SQLite file (``--database``). Without a PostgreSQL or Redis server
those runs skip, and fail under ``ONCELY_REQUIRE_SERVICES=1``.
``ledger`` and ``network`` read the service's tables directly, so every test can check what was
written (one payment, one charge), not only what was answered.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from oncely_payments import Service, Settings, create_app
from payments_testing import REDIS_URL, Ledger, Network, delete_prefix, redis_missing

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_missing() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'oncely-payments[postgres]')"
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}"
    return None


def _missing(reason: str) -> None:
    if os.environ.get("ONCELY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (ONCELY_REQUIRE_SERVICES=1: required services must be up)")
    pytest.skip(reason)


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    network = str(tmp_path / "card-network.db")
    if request.param == "sqlite":
        yield Settings(
            store=f"sqlite:{tmp_path / 'payments.db'}",
            card_network_db=network,
            card_latency_ms=0,
            lease=5,
        )
        return
    if request.param == "redis":
        missing = redis_missing()
        if missing is not None:
            _missing(missing)
        prefix = f"payments-test-{secrets.token_hex(6)}:"
        try:
            yield Settings(
                store=REDIS_URL,
                store_prefix=prefix,
                database_url=f"sqlite:{tmp_path / 'payments.db'}",
                card_network_db=network,
                card_latency_ms=0,
                lease=5,
            )
        finally:
            delete_prefix(prefix)
        return
    missing = _postgres_missing()
    if missing is not None:
        _missing(missing)
    schema = f"payments_test_{secrets.token_hex(6)}"
    try:
        yield Settings(
            store=POSTGRES_URL,
            schema=schema,
            card_network_db=network,
            card_latency_ms=0,
            lease=5,
        )
    finally:
        _drop_schema(schema)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    app = create_app(settings)
    try:
        yield app
    finally:
        await app.aclose()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=service)
    async with httpx.AsyncClient(transport=transport, base_url="http://payments.test") as c:
        yield c


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(settings)


@pytest.fixture
def network(settings: Settings) -> Network:
    return Network(settings.card_network_path)
