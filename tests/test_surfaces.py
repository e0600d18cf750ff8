"""One table of HTTP scenarios, run through the ASGI and the WSGI middleware alike.

The same API is written twice, for Starlette (ASGI) and Flask (WSGI); both run behind oncely on
one sync memory store (its async side for ASGI), in process through httpx's ASGITransport and
WSGITransport. Every scenario asserts the same answers on both surfaces.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import flask
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import oncely
import oncely.asgi
import oncely.wsgi
from oncely import Claimed, StoreUnavailable, fingerprint, storage_key, tenant_from_header
from oncely.stores.memory import AsyncMemoryStore, MemoryStore

TENANT = tenant_from_header("X-Tenant-Id")
PAYMENT = {"amount": 1000, "currency": "EUR"}
LEASE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    """What both APIs share: run counts and a gate the slow route waits on."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def pay(self, payload: Any) -> tuple[int, bytes]:
        self.runs["pay"] += 1
        body = {"id": f"pay_{self.runs['pay']}", **payload}
        return 201, json.dumps(body, separators=(",", ":")).encode()

    def slow(self) -> None:
        self.runs["slow"] += 1
        self.entered.set()
        assert self.gate.wait(10)


def starlette_app(world: World) -> Starlette:
    async def pay(request: Request) -> Response:
        status, body = world.pay(await request.json())
        return Response(body, status, media_type="application/json")

    async def fail(request: Request) -> Response:
        world.runs["fail"] += 1
        raise RuntimeError("the handler failed")

    async def slow(request: Request) -> Response:
        await asyncio.to_thread(world.slow)
        return JSONResponse({"slow": True}, 201)

    return Starlette(
        routes=[
            Route("/payments", pay, methods=["POST"]),
            Route("/fail", fail, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
        ]
    )


def flask_app(world: World) -> flask.Flask:
    app = flask.Flask("surfaces")

    @app.post("/payments")
    def pay() -> flask.Response:
        status, body = world.pay(flask.request.get_json())
        return flask.Response(body, status, content_type="application/json")

    @app.post("/fail")
    def fail() -> flask.Response:
        world.runs["fail"] += 1
        raise RuntimeError("the handler failed")

    @app.post("/slow")
    def slow() -> flask.Response:
        world.slow()
        return flask.Response(b'{"slow":true}', 201, content_type="application/json")

    return app


class Surface:
    """A client for one surface: ``post`` is awaited on both (WSGI's runs in a thread)."""

    def __init__(self, post: Callable[..., Any], world: World, store: MemoryStore) -> None:
        self._post, self.world, self.store = post, world, store

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = await self._post(path, **kwargs)
        return response


@asynccontextmanager
async def asgi(store: MemoryStore, **options: Any) -> AsyncIterator[Surface]:
    world = World()
    async_side = AsyncMemoryStore()
    async_side.sync = store  # the same records, awaited
    mw = oncely.asgi.IdempotencyMiddleware(
        starlette_app(world), store=async_side, tenant=TENANT, lease=LEASE, **options
    )
    transport = httpx.ASGITransport(app=mw, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Surface(client.post, world, store)
    await mw.drain()


@asynccontextmanager
async def wsgi(store: MemoryStore, **options: Any) -> AsyncIterator[Surface]:
    world = World()
    app = flask_app(world)
    app.wsgi_app = oncely.wsgi.IdempotencyMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, store=store, tenant=TENANT, lease=LEASE, **options
    )
    transport = httpx.WSGITransport(app=app, raise_app_exceptions=False)
    with httpx.Client(transport=transport, base_url="http://api") as client:

        async def post(path: str, **kwargs: Any) -> httpx.Response:
            return await asyncio.to_thread(client.post, path, **kwargs)

        yield Surface(post, world, store)


SURFACES = {"asgi": asgi, "wsgi": wsgi}


@pytest.fixture(params=sorted(SURFACES))
def surface_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def headers(key: str | None = None, tenant: str = "acme") -> dict[str, str]:
    out = {"X-Tenant-Id": tenant}
    if key is not None:
        out["Idempotency-Key"] = key
    return out


def new_key() -> str:
    return str(uuid.uuid4())


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    kind: str = response.json()["type"]
    return kind.rsplit("/", 1)[1]


async def test_a_repeat_is_replayed_byte_for_byte_and_runs_once(surface_kind: str) -> None:
    """The stored status, headers and body come back on a repeat; the handler ran once."""
    async with SURFACES[surface_kind](MemoryStore()) as api:
        key = new_key()
        first = await api.post("/payments", json=PAYMENT, headers=headers(key))
        again = await api.post("/payments", json=PAYMENT, headers=headers(key))
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert api.world.runs["pay"] == 1


async def test_another_payload_under_the_key_is_422(surface_kind: str) -> None:
    async with SURFACES[surface_kind](MemoryStore()) as api:
        key = new_key()
        await api.post("/payments", json=PAYMENT, headers=headers(key))
        other = await api.post("/payments", json={"amount": 1}, headers=headers(key))
    assert other.status_code == 422
    assert problem_type(other) == "idempotency-key-reused"
    assert api.world.runs["pay"] == 1


@pytest.mark.parametrize(
    ("key", "status", "kind"),
    [
        pytest.param(None, 400, "missing-idempotency-key", id="no-key"),
        pytest.param("", 400, "malformed-idempotency-key", id="empty-key"),
        pytest.param("a b", 400, "malformed-idempotency-key", id="space-in-key"),
        pytest.param("k" * 256, 400, "malformed-idempotency-key", id="key-too-long"),
    ],
)
async def test_a_missing_or_malformed_key_is_400_and_nothing_runs(
    surface_kind: str, key: str | None, status: int, kind: str
) -> None:
    async with SURFACES[surface_kind](MemoryStore()) as api:
        response = await api.post("/payments", json=PAYMENT, headers=headers(key))
    assert response.status_code == status
    assert problem_type(response) == kind
    assert api.world.runs["pay"] == 0


async def test_a_body_over_the_limit_is_413(surface_kind: str) -> None:
    async with SURFACES[surface_kind](MemoryStore(), max_request_body=100) as api:
        response = await api.post("/payments", content=b"x" * 101, headers=headers(new_key()))
    assert response.status_code == 413
    assert problem_type(response) == "request-too-large"
    assert api.world.runs["pay"] == 0


class DownStore(MemoryStore):
    def claim(self, key: str, fingerprint: str, *, lease: float) -> Any:
        raise StoreUnavailable("the store is down")


async def test_a_store_that_is_down_is_503_and_nothing_runs(surface_kind: str) -> None:
    async with SURFACES[surface_kind](DownStore()) as api:
        response = await api.post("/payments", json=PAYMENT, headers=headers(new_key()))
    assert response.status_code == 503
    assert problem_type(response) == "idempotency-store-unavailable"
    assert response.headers["retry-after"] == "1"
    assert api.world.runs["pay"] == 0


async def test_an_error_releases_the_key_so_a_retry_runs_again(surface_kind: str) -> None:
    async with SURFACES[surface_kind](MemoryStore()) as api:
        key = new_key()
        first = await api.post("/fail", headers=headers(key))
        second = await api.post("/fail", headers=headers(key))
    assert first.status_code == second.status_code == 500
    assert api.world.runs["fail"] == 2


async def test_a_concurrent_duplicate_is_409_while_the_first_runs(surface_kind: str) -> None:
    async with SURFACES[surface_kind](MemoryStore()) as api:
        key = new_key()
        first = asyncio.ensure_future(api.post("/slow", headers=headers(key)))
        assert await asyncio.to_thread(api.world.entered.wait, 10)
        duplicate = await api.post("/slow", headers=headers(key))
        api.world.gate.set()
        done = await first
        again = await api.post("/slow", headers=headers(key))
    assert duplicate.status_code == 409
    assert problem_type(duplicate) == "idempotency-key-in-flight"
    assert done.status_code == 201
    assert again.content == done.content
    assert api.world.runs["slow"] == 1


async def test_a_crashed_holders_key_is_taken_over_after_its_lease(surface_kind: str) -> None:
    """A holder that died (its claim never completed) keeps the key for its lease; then the
    same request takes it over and runs once."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    body = json.dumps(PAYMENT).encode()
    key = new_key()
    fp = fingerprint("POST", "/payments", "", "application/json", body)
    crashed = store.claim(storage_key("acme", key), fp, lease=LEASE)
    assert isinstance(crashed, Claimed)
    content = {"content": body, "headers": {**headers(key), "content-type": "application/json"}}
    async with SURFACES[surface_kind](store) as api:
        during = await api.post("/payments", **content)
        clock.now += LEASE + 1
        after = await api.post("/payments", **content)
        again = await api.post("/payments", **content)
    assert during.status_code == 409
    assert after.status_code == 201
    assert again.content == after.content
    assert api.world.runs["pay"] == 1


def test_a_sync_checkpoint_under_wsgi_is_kept_and_resumed_from() -> None:
    """``checkpoint_sync`` records a recovery point on the store's sync side; the repeat after
    a release sees it, and the phase does not run again."""
    store = MemoryStore()
    phases_run: Counter[str] = Counter()
    app = flask.Flask(__name__)

    @app.post("/pay")
    def pay() -> flask.Response:
        attempt = oncely.current_attempt()
        if not attempt.done("created"):
            phases_run["created"] += 1
            attempt.checkpoint_sync("created", {"id": "pay_1"})
        if attempt.number == 1:
            return flask.Response("try again", status=503)  # released: the retry resumes
        return flask.Response(json.dumps(attempt.data("created")), status=201)

    app.wsgi_app = oncely.wsgi.IdempotencyMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, store=store, tenant=TENANT, lease=LEASE
    )
    key = str(uuid.uuid4())
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://api") as client:
        first = client.post("/pay", headers={"Idempotency-Key": key, "X-Tenant-Id": "acme"})
        second = client.post("/pay", headers={"Idempotency-Key": key, "X-Tenant-Id": "acme"})
    assert first.status_code == 503
    assert second.status_code == 201
    assert second.json() == {"id": "pay_1"}
    assert phases_run["created"] == 1


async def test_a_sync_checkpoint_on_an_async_store_says_what_to_call() -> None:
    """Under ASGI the store is async: ``checkpoint_sync`` refuses and names the async call."""
    outcome: list[str] = []

    async def pay(request: Request) -> Response:
        try:
            oncely.current_attempt().checkpoint_sync("created", {"id": "pay_1"})
        except oncely.ConfigurationError as exc:
            outcome.append(str(exc))
        return JSONResponse({}, status_code=201)

    app = oncely.asgi.IdempotencyMiddleware(
        Starlette(routes=[Route("/pay", pay, methods=["POST"])]),
        store=AsyncMemoryStore(),
        tenant=TENANT,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.post(
            "/pay", headers={"Idempotency-Key": str(uuid.uuid4()), "X-Tenant-Id": "acme"}
        )
    await app.aclose()
    assert answer.status_code == 201
    assert len(outcome) == 1
    assert "await attempt.checkpoint" in outcome[0]
