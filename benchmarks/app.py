"""The benchmark app: one real-handler-shaped endpoint, bare or behind an idempotency layer.

    POST /payments   parse a ~300-byte JSON payment, validate it, answer 201 JSON + Location
    GET  /_bench     how many times the handler ran (so a run can prove replays did not run it)

uvicorn builds it with ``--factory app:build``; the environment says what wraps it:

    BENCH_TARGET   bare | oncely | asgi-idempotency-header | fastapi-idempotency |
                   fastapi-idempotency-key | idemkit | fastidempotent
    BENCH_STORE    memory | sqlite | postgres | redis (what TARGETS lists for the target)
    BENCH_SCRATCH  a directory for SQLite files
    BENCH_PREFIX   the table, schema or key prefix this server's records live under
    BENCH_PG_URL, BENCH_REDIS_URL
    BENCH_OBSERVE  off | metrics | metrics+logs: oncely's Prometheus hook, and one JSON log
                   line per decision to a file in BENCH_SCRATCH (default off)
    BENCH_HANDLER_US  extra CPU the handler burns per payment, in microseconds (default 0), to
                   see how the ratios move with a heavier handler

Every layer is configured the way its README recommends, scoped by the ``X-Tenant-Id`` header
where the layer has scopes, added with ``app.add_middleware`` so all of them sit at the same place
in the Starlette stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# target -> stores it runs on. Peers list only the stores they ship.
TARGETS: dict[str, tuple[str, ...]] = {
    "bare": ("none",),
    "oncely": ("memory", "sqlite", "postgres", "redis"),
    "asgi-idempotency-header": ("memory", "redis"),
    "fastapi-idempotency": ("memory",),
    "fastapi-idempotency-key": ("memory", "sqlite", "redis"),
    "idemkit": ("memory", "redis", "postgres"),
    "fastidempotent": ("memory", "sqlite", "redis", "postgres"),
}

TENANT_HEADER = "X-Tenant-Id"
CURRENCIES = frozenset({"EUR", "USD", "GBP", "CHF", "JPY", "SEK"})
METHODS = frozenset({"card", "sepa_debit", "ach"})

_runs = 0
_work_seconds = float(os.environ.get("BENCH_HANDLER_US", "0")) / 1e6


def _problems(data: object) -> list[str]:
    if not isinstance(data, dict):
        return ["the body must be a JSON object"]
    problems = []
    amount = data.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= 10**9:
        problems.append("amount must be a positive integer of minor units")
    if data.get("currency") not in CURRENCIES:
        problems.append("currency is not supported")
    if not isinstance(data.get("customer"), str) or not data["customer"].startswith("cus_"):
        problems.append("customer must be a customer id")
    source = data.get("source")
    if not isinstance(source, dict) or source.get("method") not in METHODS:
        problems.append("source.method is not supported")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict) or len(metadata) > 20:
        problems.append("metadata must be an object of at most 20 entries")
    return problems


async def create_payment(request: Request) -> Response:
    global _runs
    try:
        data = json.loads(await request.body())
    except ValueError:
        return JSONResponse({"detail": "the body is not JSON"}, status_code=400)
    problems = _problems(data)
    if problems:
        return JSONResponse({"detail": problems}, status_code=422)
    _runs += 1
    if _work_seconds:
        until = time.perf_counter() + _work_seconds
        while time.perf_counter() < until:
            pass
    payment_id = f"pay_{uuid.uuid4().hex}"
    payment = {
        "id": payment_id,
        "object": "payment",
        "status": "succeeded",
        "amount": data["amount"],
        "currency": data["currency"],
        "customer": data["customer"],
        "description": data.get("description", ""),
        "source": {"method": data["source"]["method"], "last4": data["source"].get("last4")},
        "metadata": data.get("metadata", {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return JSONResponse(payment, status_code=201, headers={"Location": f"/payments/{payment_id}"})


async def stats(request: Request) -> Response:
    return JSONResponse({"handler_runs": _runs})


Closer = Callable[[], Awaitable[None]]


def build() -> Starlette:
    target = os.environ.get("BENCH_TARGET", "bare")
    store = os.environ.get("BENCH_STORE", "none")
    if store not in TARGETS.get(target, ()):
        raise SystemExit(f"unknown target {target!r} on store {store!r}")
    closers: list[Closer] = []
    openers: list[Closer] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for opener in openers:
            await opener()
        yield
        for closer in closers:
            with contextlib.suppress(Exception):
                await closer()

    app = Starlette(
        routes=[
            Route("/payments", create_payment, methods=["POST"]),
            Route("/_bench", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    if target != "bare":
        _WIRING[target](app, store, openers, closers)
    return app


def _env(name: str) -> str:
    return os.environ[name]


def _sqlite_path(target: str) -> str:
    return os.path.join(_env("BENCH_SCRATCH"), f"{_env('BENCH_PREFIX')}-{target}.db")


def _tenant(headers: Any) -> str | None:
    value: str | None = headers.get(TENANT_HEADER.lower())
    return value


def _oncely(app: Starlette, store: str, openers: list[Closer], closers: list[Closer]) -> None:
    from oncely import open_async_store, tenant_from_header
    from oncely.asgi import IdempotencyMiddleware

    prefix = _env("BENCH_PREFIX")
    if store == "memory":
        backend = open_async_store("memory:")
    elif store == "sqlite":
        backend = open_async_store(f"sqlite:{_sqlite_path('oncely')}")
    elif store == "postgres":
        backend = open_async_store(_env("BENCH_PG_URL"), **_options("postgres", prefix))
    else:
        backend = open_async_store(_env("BENCH_REDIS_URL"), **_options("redis", prefix))
    closers.append(backend.aclose)
    app.add_middleware(
        IdempotencyMiddleware,
        store=backend,
        tenant=tenant_from_header(TENANT_HEADER),
        on_decision=_observers(backend),
    )


def _observers(store: object) -> list[Any]:
    """BENCH_OBSERVE: what watches every decision (see the module's docstring)."""
    mode = os.environ.get("BENCH_OBSERVE", "off")
    if mode == "off":
        return []
    if mode not in ("metrics", "metrics+logs"):
        raise SystemExit(f"unknown BENCH_OBSERVE {mode!r}: off, metrics or metrics+logs")
    import logging

    from prometheus_client import CollectorRegistry

    from oncely.logs import JSONFormatter
    from oncely.metrics import Metrics

    if mode == "metrics+logs":
        handler = logging.FileHandler(os.path.join(_env("BENCH_SCRATCH"), "decisions.log"))
        handler.setFormatter(JSONFormatter())
        logger = logging.getLogger("oncely")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return [Metrics(registry=CollectorRegistry(), store=store)]


def _options(store: str, prefix: str) -> dict[str, str]:
    """The option that gives the store its own schema (PostgreSQL) or key prefix (Redis)."""
    return {"schema": prefix} if store == "postgres" else {"prefix": f"{prefix}:"}


def _asgi_idempotency_header(
    app: Starlette, store: str, openers: list[Closer], closers: list[Closer]
) -> None:
    from idempotency_header_middleware import IdempotencyHeaderMiddleware
    from idempotency_header_middleware.backends.base import Backend

    backend: Backend
    if store == "memory":
        from idempotency_header_middleware.backends.memory import MemoryBackend

        backend = MemoryBackend()
    else:
        from idempotency_header_middleware.backends.redis import RedisBackend
        from redis.asyncio import Redis

        client = Redis.from_url(_env("BENCH_REDIS_URL"))
        prefix = _env("BENCH_PREFIX")
        backend = RedisBackend(
            redis=client, keys_key=f"{prefix}:keys", response_key=f"{prefix}:responses:"
        )
        closers.append(client.aclose)
    app.add_middleware(IdempotencyHeaderMiddleware, backend=backend)


def _fastapi_idempotency(
    app: Starlette, store: str, openers: list[Closer], closers: list[Closer]
) -> None:
    from fastapi_idempotency import IdempotencyMiddleware, MemoryStore

    app.add_middleware(
        IdempotencyMiddleware,
        store=MemoryStore(),
        scope=lambda request: request.headers.get(TENANT_HEADER, ""),
    )


def _fastapi_idempotency_key(
    app: Starlette, store: str, openers: list[Closer], closers: list[Closer]
) -> None:
    from fastapi_idempotency_key import (
        BaseIdempotencyBackend,
        IdempotencyMiddleware,
        MemoryBackend,
        RedisBackend,
        SQLiteBackend,
    )

    backend: BaseIdempotencyBackend
    if store == "memory":
        backend = MemoryBackend()
    elif store == "sqlite":
        backend = SQLiteBackend(_sqlite_path("fastapi-idempotency-key"))
    else:
        backend = RedisBackend(redis_url=_env("BENCH_REDIS_URL"), prefix=f"{_env('BENCH_PREFIX')}:")
    if hasattr(backend, "close"):
        closers.append(backend.close)
    app.add_middleware(IdempotencyMiddleware, backend=backend)


def _idemkit(app: Starlette, store: str, openers: list[Closer], closers: list[Closer]) -> None:
    from idemkit import HttpConfig, IdempotencyMiddleware, InMemoryBackend

    prefix = _env("BENCH_PREFIX")
    backend: Any
    if store == "memory":
        backend = InMemoryBackend()
    elif store == "redis":
        from idemkit.backends.redis import RedisBackend

        backend = RedisBackend.from_url(_env("BENCH_REDIS_URL"), namespace=prefix)
    else:
        from idemkit.backends.postgres import PostgresBackend, init_pg

        table = f"{prefix}_idemkit"

        async def create_table() -> None:
            await init_pg(_env("BENCH_PG_URL"), table=table)

        openers.append(create_table)
        backend = PostgresBackend.from_url(_env("BENCH_PG_URL"), table=table)
    app.add_middleware(
        IdempotencyMiddleware,
        backend=backend,
        config=HttpConfig(scope=lambda request: request.headers.get(TENANT_HEADER)),
    )


def _fastidempotent(
    app: Starlette, store: str, openers: list[Closer], closers: list[Closer]
) -> None:
    from fastidempotent import IdempotencyMiddleware
    from fastidempotent.backends.base import BaseBackend

    prefix = _env("BENCH_PREFIX")
    backend: BaseBackend
    if store == "memory":
        from fastidempotent.backends.memory import MemoryBackend

        backend = MemoryBackend()
    elif store == "sqlite":
        from fastidempotent.backends.sqlite import SQLiteBackend

        backend = SQLiteBackend(
            url=f"sqlite+aiosqlite:///{_sqlite_path('fastidempotent')}",
            table_name=f"{prefix}_fastidempotent",
        )
    elif store == "redis":
        from fastidempotent.backends.redis import RedisBackend

        backend = RedisBackend(url=_env("BENCH_REDIS_URL"), key_prefix=f"{prefix}:")
    else:
        from fastidempotent.backends.postgres import PostgresBackend

        url = _env("BENCH_PG_URL").replace("postgresql://", "postgresql+asyncpg://", 1)
        backend = PostgresBackend(url=url, table_name=f"{prefix}_fastidempotent")
    openers.append(backend.init)
    closers.append(backend.close)
    app.add_middleware(IdempotencyMiddleware, backend=backend)


_WIRING: dict[str, Callable[[Starlette, str, list[Closer], list[Closer]], None]] = {
    "oncely": _oncely,
    "asgi-idempotency-header": _asgi_idempotency_header,
    "fastapi-idempotency": _fastapi_idempotency,
    "fastapi-idempotency-key": _fastapi_idempotency_key,
    "idemkit": _idemkit,
    "fastidempotent": _fastidempotent,
}
