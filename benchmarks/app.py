"""The benchmark app: a payments endpoint, bare or behind an idempotency layer.

    POST /payments   create a payment: answer 201 JSON + Location
    GET  /_bench     how many times the handler ran (so a run can prove replays did not run it)

Two endpoints, chosen by ``BENCH_ENDPOINT``:

    contract (default)  the contract endpoint of issue 11: FastAPI, the ~300-byte JSON payment
                   validated by a pydantic model, one INSERT + COMMIT of a row in the app's own
                   SQLite ledger (a file in BENCH_SCRATCH, WAL, synchronous=NORMAL), answered
                   by a pydantic response model. The handler is a plain ``def``, so FastAPI runs
                   it in its thread pool, as a user with the sqlite3 module would write it; one
                   connection per process, shared by the pool's threads under a lock.
    light          Starlette, the same payment parsed with ``json`` and checked by hand, nothing
                   written: the light handler that issue 12's overhead goal is measured at.

uvicorn builds it with ``--factory app:build``; the environment says what wraps it:

    BENCH_TARGET   bare | oncely | asgi-idempotency-header | fastapi-idempotency |
                   fastapi-idempotency-key | idemkit | fastidempotent
    BENCH_STORE    memory | sqlite | postgres | redis (what TARGETS lists for the target)
    BENCH_ENDPOINT contract | light (default contract)
    BENCH_SCRATCH  a directory for SQLite files (the stores' and the ledger)
    BENCH_PREFIX   the table, schema or key prefix this server's records live under
    BENCH_PG_URL, BENCH_REDIS_URL
    BENCH_REDIS_LANES  benchmark-only: how many round trips oncely's Redis store keeps in
                   flight at once (its natural batching; unset: the store's default)
    BENCH_OBSERVE  off | metrics | metrics+logs: oncely's Prometheus hook, and one JSON log
                   line per decision to a file in BENCH_SCRATCH (default off)
    BENCH_HANDLER_US  extra CPU the handler burns per payment, in microseconds (default 0), to
                   see how the ratios move with a heavier handler

``GET /_bench`` answers ``handler_runs`` (this process) and, for the contract endpoint,
``ledger_rows``: the rows in the ledger, which every worker of a multi-worker server writes to,
so it counts the handler's runs across workers.

Every layer is configured the way its README recommends, scoped by the ``X-Tenant-Id`` header
where the layer has scopes, added with ``app.add_middleware`` so all of them sit at the same place
in the Starlette stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Header
from pydantic import BaseModel, Field
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


# The contract endpoint: FastAPI, pydantic, one SQLite row per payment. ----------------------


class Source(BaseModel):
    method: Literal["card", "sepa_debit", "ach"]
    last4: str | None = Field(default=None, pattern=r"^[0-9]{4}$")
    exp_month: int | None = Field(default=None, ge=1, le=12)
    exp_year: int | None = Field(default=None, ge=2000, le=2100)


class PaymentIn(BaseModel):
    amount: int = Field(gt=0, le=10**9, description="minor units")
    currency: Literal["EUR", "USD", "GBP", "CHF", "JPY", "SEK"]
    customer: str = Field(pattern=r"^cus_[A-Za-z0-9]+$")
    description: str = Field(default="", max_length=500)
    source: Source
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)
    capture: bool = True
    statement_descriptor: str | None = Field(default=None, max_length=22)


class Payment(PaymentIn):
    id: str
    object: Literal["payment"] = "payment"
    status: Literal["succeeded", "pending"]
    created: datetime


class Ledger:
    """The app's own SQLite file: one row per payment, nothing to do with any idempotency store.

    One connection per process, opened at startup, WAL and synchronous=NORMAL. The endpoint is a
    plain ``def``, so FastAPI runs it in its thread pool; the pool's threads share the connection
    under a lock (``check_same_thread=False``, as FastAPI's docs set it). Workers of one server
    share the file; SQLite's own lock (busy timeout 30 s) orders their writes.
    """

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
        with self.lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, customer TEXT NOT NULL,"
                " amount INTEGER NOT NULL, currency TEXT NOT NULL, method TEXT NOT NULL,"
                " description TEXT NOT NULL, created TEXT NOT NULL, idempotency_key TEXT)"
            )
            self.conn.commit()

    def insert(self, payment: Payment, idempotency_key: str | None) -> None:
        """One INSERT and one COMMIT."""
        global _runs
        with self.lock:
            self.conn.execute(
                "INSERT INTO payments (id, customer, amount, currency, method, description,"
                " created, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    payment.id,
                    payment.customer,
                    payment.amount,
                    payment.currency,
                    payment.source.method,
                    payment.description,
                    payment.created.isoformat(),
                    idempotency_key,
                ),
            )
            self.conn.commit()
            _runs += 1

    def rows(self) -> int:
        with self.lock:
            # Rows are only ever inserted, so the highest rowid is the count, without a scan.
            row = self.conn.execute("SELECT max(rowid) FROM payments").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


_ledger: Ledger | None = None
_opening = threading.Lock()


def _the_ledger() -> Ledger:
    """The ledger, opened at startup; or on first use, for an app called without its lifespan
    (in process, as benchmarks/observe.py does)."""
    global _ledger
    if _ledger is None:
        with _opening:
            if _ledger is None:
                _ledger = Ledger(_sqlite_path("ledger"))
    return _ledger


def create_payment_contract(
    payment: PaymentIn,
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Payment:
    """POST /payments: validated by pydantic before it runs; writes the ledger row (with the
    request's Idempotency-Key, so a run can count payments made twice for one key), answers."""
    if _work_seconds:
        until = time.perf_counter() + _work_seconds
        while time.perf_counter() < until:
            pass
    created = Payment(
        **payment.model_dump(),
        id=f"pay_{uuid.uuid4().hex}",
        status="succeeded",
        created=datetime.now(UTC).replace(microsecond=0),
    )
    _the_ledger().insert(created, idempotency_key)
    response.headers["Location"] = f"/payments/{created.id}"
    return created


def stats_contract() -> dict[str, int]:
    return {"handler_runs": _runs, "ledger_rows": _the_ledger().rows()}


Closer = Callable[[], Awaitable[None]]


def _contract_app(lifespan: Any) -> Starlette:
    from fastapi import FastAPI

    api = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    api.post("/payments", status_code=201, response_model=Payment)(create_payment_contract)
    api.get("/_bench")(stats_contract)
    return api


def _light_app(lifespan: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/payments", create_payment, methods=["POST"]),
            Route("/_bench", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def build() -> Starlette:
    target = os.environ.get("BENCH_TARGET", "bare")
    store = os.environ.get("BENCH_STORE", "none")
    endpoint = os.environ.get("BENCH_ENDPOINT", "contract")
    if store not in TARGETS.get(target, ()):
        raise SystemExit(f"unknown target {target!r} on store {store!r}")
    if endpoint not in ("contract", "light"):
        raise SystemExit(f"unknown BENCH_ENDPOINT {endpoint!r}: contract or light")
    closers: list[Closer] = []
    openers: list[Closer] = []

    if endpoint == "contract":

        async def open_ledger() -> None:
            _the_ledger()

        async def close_ledger() -> None:
            if _ledger is not None:
                _ledger.close()

        openers.append(open_ledger)
        closers.append(close_ledger)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for opener in openers:
            await opener()
        yield
        for closer in closers:
            with contextlib.suppress(Exception):
                await closer()

    app = _contract_app(lifespan) if endpoint == "contract" else _light_app(lifespan)
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
        lanes = os.environ.get("BENCH_REDIS_LANES")
        if lanes:
            # Benchmark-only: the store has no option for it; its batcher's lane count is read
            # on every submit, so setting it before the first request is enough.
            batcher = getattr(backend, "_batcher", None)
            if batcher is None or not hasattr(batcher, "lanes"):
                raise SystemExit("BENCH_REDIS_LANES: this Redis store has no batcher with lanes")
            batcher.lanes = int(lanes)
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
