"""Helpers for the service's tests: requests, and direct reads of the ledger and the network."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from oncely_payments import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
API_KEY = "sk_test_alice"
OTHER_API_KEY = "sk_test_bob"


def auth(api_key: str = API_KEY, key: str | None = None, **extra: str) -> dict[str, str]:
    """Headers: the tenant's API key, and an Idempotency-Key when given."""
    headers = {"Authorization": f"Bearer {api_key}", **extra}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def new_key() -> str:
    return str(uuid.uuid4())


def payment(amount: int = 1000, currency: str = "USD", customer: str = "cus_1") -> dict[str, Any]:
    return {"amount": amount, "currency": currency, "customer": customer}


async def pay(
    client: httpx.AsyncClient,
    key: str | None = None,
    *,
    api_key: str = API_KEY,
    **body: Any,
) -> httpx.Response:
    return await client.post(
        "/payments", json=payment(**body), headers=auth(api_key, key or new_key())
    )


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows from a SQLite file; none while a table does not exist yet."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        try:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise


def redis_missing() -> str | None:
    """Why the Redis tests cannot run (no server at 127.0.0.1:6379), or None."""
    import redis

    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"Redis not reachable at 127.0.0.1:6379: {exc}"
    return None


def delete_prefix(prefix: str) -> int:
    """Delete every Redis key under ``prefix``; how many there were."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        names = list(client.scan_iter(match=prefix + "*", count=1000))
        return int(client.delete(*names)) if names else 0


def pg_rows(url: str, schema: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows from PostgreSQL, in ``schema``; none while a table does not exist yet."""
    import psycopg

    with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
        try:
            return [tuple(row) for row in conn.execute(sql).fetchall()]
        except psycopg.errors.UndefinedTable:
            return []


@dataclass
class Ledger:
    """The ledger's tables, read the way an auditor would."""

    settings: Settings

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        database = self.settings.database
        if database is not None:
            return rows(database, sql)
        return pg_rows(self.settings.ledger_url, self.settings.schema, sql)

    def payments(self) -> list[dict[str, Any]]:
        names = ("id", "tenant", "customer", "amount", "currency", "status", "charge_id")
        found = self._rows(f"SELECT {', '.join(names)} FROM payments ORDER BY seq")
        return [dict(zip(names, row, strict=True)) for row in found]

    def count(self) -> int:
        return len(self.payments())

    def orders(self) -> int:
        return len(self._rows("SELECT id FROM orders"))


@dataclass
class Network:
    """The card network's own record of charges and calls."""

    path: Path

    def charges(self) -> list[dict[str, Any]]:
        names = ("idempotency_key", "id", "amount", "currency", "customer", "outcome")
        found = rows(self.path, f"SELECT {', '.join(names)} FROM charges")
        return [dict(zip(names, row, strict=True)) for row in found]

    def calls(self) -> int:
        found = rows(self.path, "SELECT coalesce(sum(calls), 0) FROM calls")
        return int(found[0][0]) if found else 0
