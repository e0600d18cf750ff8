"""The ASGI middleware in process: a Starlette app behind it, driven through httpx."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
)
from starlette.background import BackgroundTask
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from oncely import (
    Claimed,
    Existing,
    Route,
    StoredResponse,
    StoreUnavailable,
    Tenant,
    single_tenant,
    tenant_from_header,
    tenant_from_principal,
)
from oncely.asgi import IdempotencyMiddleware
from oncely.stores import AsyncStore
from oncely.stores.memory import AsyncMemoryStore

from .conftest import Clock

PROBLEMS = "https://oncely.dev/problems/"
TENANT = tenant_from_header("X-Tenant-Id")
PAYMENT = {"amount": 1000, "currency": "EUR", "customer": "cus_1"}

ASGIMessage = MutableMapping[str, Any]


# The app behind the middleware ------------------------------------------------------------


class Api:
    """A Starlette app whose handlers count how often they run, by path."""

    def __init__(self, *, delay: float = 0.0, big: int = 5000) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.delay = delay
        self.running = asyncio.Event()  # set when a payment handler has started
        self.gate: asyncio.Event | None = None  # if set, payment handlers wait for it
        self.big = big
        self.received: list[bytes] = []

    def _count(self, request: Request) -> int:
        self.runs[request.url.path] += 1
        return self.runs[request.url.path]

    async def payment(self, request: Request) -> Response:
        body = await request.body()
        n = self._count(request)
        self.running.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        response = JSONResponse(
            {"id": f"pay_{n}", "request": json.loads(body) if body else None},
            status_code=201,
            headers={
                "Location": f"/payments/pay_{n}",
                "ETag": f'"v{n}"',
                "X-Debug": "1",
                "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
        )
        response.set_cookie("session", "s3cret-cookie")
        return response

    async def echo(self, request: Request) -> Response:
        body = await request.body()
        self.received.append(body)
        self._count(request)
        return Response(body, 200, media_type=request.headers.get("content-type"))

    async def item(self, request: Request) -> Response:
        n = self._count(request)
        return JSONResponse({"method": request.method, "n": n})

    async def status(self, request: Request) -> Response:
        self._count(request)
        code = int(request.path_params["code"])
        return JSONResponse({"status": code}, status_code=code)

    async def fail(self, request: Request) -> Response:
        self._count(request)
        raise RuntimeError("the handler failed")

    async def big_body(self, request: Request) -> Response:
        self._count(request)
        return Response(b"x" * self.big, 201, headers={"Location": "/reports/1"})

    async def stream(self, request: Request) -> Response:
        self._count(request)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"chunk-{i};".encode()

        return StreamingResponse(chunks(), status_code=201, media_type="text/plain")

    async def redirect(self, request: Request) -> Response:
        self._count(request)
        return RedirectResponse("/payments/pay_1", status_code=303)

    async def background_fails(self, request: Request) -> Response:
        self._count(request)

        async def task() -> None:
            raise RuntimeError("the background task failed")

        return JSONResponse({"id": "pay_bg"}, status_code=201, background=BackgroundTask(task))

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                StarletteRoute("/payments", self.payment, methods=["POST", "PATCH"]),
                StarletteRoute("/short", self.payment, methods=["POST"]),
                StarletteRoute("/optional", self.payment, methods=["POST"]),
                StarletteRoute("/off", self.payment, methods=["POST"]),
                StarletteRoute("/echo", self.echo, methods=["POST"]),
                StarletteRoute("/items/{id}", self.item, methods=["GET", "PUT", "DELETE", "POST"]),
                StarletteRoute("/api/{rest:path}", self.item, methods=["PUT", "DELETE"]),
                StarletteRoute("/status/{code}", self.status, methods=["POST"]),
                StarletteRoute("/fail", self.fail, methods=["POST"]),
                StarletteRoute("/big", self.big_body, methods=["POST"]),
                StarletteRoute("/stream", self.stream, methods=["POST"]),
                StarletteRoute("/redirect", self.redirect, methods=["POST"]),
                StarletteRoute("/background", self.background_fails, methods=["POST"]),
            ]
        )


@asynccontextmanager
async def serve(
    store: str | AsyncStore = "memory:",
    *,
    api: Api | None = None,
    tenant: Tenant = TENANT,
    raise_app_exceptions: bool = True,
    **options: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, Api]]:
    """A client for ``api`` behind the middleware; the store is closed afterwards."""
    api = api or Api()
    mw = IdempotencyMiddleware(api.app(), store=store, tenant=tenant, **options)
    transport = httpx.ASGITransport(app=mw, raise_app_exceptions=raise_app_exceptions)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client, api
    finally:
        await mw.aclose()


def new_key() -> str:
    return str(uuid.uuid4())


def headers(key: str | None = None, tenant: str | None = "acme") -> dict[str, str]:
    out: dict[str, str] = {}
    if key is not None:
        out["Idempotency-Key"] = key
    if tenant is not None:
        out["X-Tenant-Id"] = tenant
    return out


def problem(response: httpx.Response, slug: str, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem of this type and status; its fields."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEMS + slug
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def replayed(response: httpx.Response) -> bool:
    return bool(response.headers.get("idempotent-replayed") == "true")


def files_bytes(folder: Path, prefix: str) -> bytes:
    """Every byte of the files in ``folder`` whose name starts with ``prefix``."""
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith(prefix))


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory:"
    return f"sqlite:{tmp_path / 'oncely.db'}"


# First request, repeat, other payload -----------------------------------------------------


async def test_a_repeat_gets_the_stored_answer_and_the_app_runs_once(store_url: str) -> None:
    """Same key, same request: identical status, kept headers and body, marked as replayed."""
    async with serve(store_url) as (client, api):
        h = headers(new_key())
        first = await client.post("/payments", json=PAYMENT, headers=h)
        second = await client.post("/payments", json=PAYMENT, headers=h)

    assert first.status_code == 201
    assert not replayed(first)
    assert "set-cookie" in first.headers  # the first client gets the whole answer
    assert "date" in first.headers
    assert second.status_code == 201
    assert replayed(second)
    assert second.content == first.content
    for name in ("content-type", "location", "etag"):
        assert second.headers[name] == first.headers[name]
    assert second.headers["content-length"] == str(len(first.content))
    assert "set-cookie" not in second.headers
    assert "x-debug" not in second.headers
    assert "date" not in second.headers
    assert api.runs["/payments"] == 1


async def test_every_later_repeat_is_replayed_too(store_url: str) -> None:
    """A key keeps answering with the first result however often it is retried."""
    async with serve(store_url) as (client, api):
        h = headers(new_key())
        answers = [await client.post("/payments", json=PAYMENT, headers=h) for _ in range(4)]
    assert {a.content for a in answers} == {answers[0].content}
    assert [replayed(a) for a in answers] == [False, True, True, True]
    assert api.runs["/payments"] == 1


async def test_another_payload_with_the_same_key_is_422_and_does_not_run(store_url: str) -> None:
    """A reused key with a different request is refused with its own problem type."""
    async with serve(store_url) as (client, api):
        h = headers(new_key())
        await client.post("/payments", json=PAYMENT, headers=h)
        other = await client.post("/payments", json={**PAYMENT, "amount": 5}, headers=h)
    problem(other, "idempotency-key-reused", 422)
    assert api.runs["/payments"] == 1


async def test_the_same_key_on_another_path_is_422() -> None:
    """The path is part of the request: the key cannot be moved to another endpoint."""
    async with serve() as (client, api):
        h = headers(new_key())
        await client.post("/payments", json=PAYMENT, headers=h)
        other = await client.post("/echo", json=PAYMENT, headers=h)
    problem(other, "idempotency-key-reused", 422)
    assert api.runs["/echo"] == 0


async def test_an_equivalent_json_payload_is_replayed() -> None:
    """Reordered keys and other whitespace are the same request."""
    async with serve() as (client, api):
        h = {**headers(new_key()), "Content-Type": "application/json"}
        await client.post("/payments", content=b'{"a":1,"b":[1,2]}', headers=h)
        again = await client.post("/payments", content=b'{ "b": [1, 2.0], "a": 1 }', headers=h)
    assert again.status_code == 201
    assert replayed(again)
    assert api.runs["/payments"] == 1


async def test_patch_is_protected_by_default() -> None:
    """POST and PATCH are the default methods."""
    async with serve() as (client, api):
        h = headers(new_key())
        await client.patch("/payments", json=PAYMENT, headers=h)
        again = await client.patch("/payments", json=PAYMENT, headers=h)
    assert replayed(again)
    assert api.runs["/payments"] == 1


async def test_redirects_are_kept_and_replayed() -> None:
    """A 3xx with its Location is an answer like any other."""
    async with serve() as (client, api):
        h = headers(new_key())
        first = await client.post("/redirect", headers=h)
        second = await client.post("/redirect", headers=h)
    assert first.status_code == second.status_code == 303
    assert second.headers["location"] == "/payments/pay_1"
    assert replayed(second)
    assert api.runs["/redirect"] == 1


async def test_a_trailing_slash_redirect_releases_the_key_so_the_redirected_request_runs_once() -> (
    None
):
    """POST /payments/ is redirected (307) to /payments by the router; the client follows it with
    the same key. The 307 is not the outcome: the redirected request runs, once."""
    async with serve() as (client, api):
        h = headers(new_key())
        redirected = await client.post("/payments/", json=PAYMENT, headers=h)
        followed = await client.post("/payments/", json=PAYMENT, headers=h, follow_redirects=True)
        again = await client.post("/payments", json=PAYMENT, headers=h)
    assert redirected.status_code == 307
    assert redirected.headers["location"].endswith("/payments")
    assert followed.status_code == 201, followed.text
    assert not replayed(followed)
    assert [r.status_code for r in followed.history] == [307]
    assert replayed(again)
    assert again.content == followed.content
    assert api.runs["/payments"] == 1


@pytest.mark.parametrize("code", [307, 308])
async def test_307_and_308_are_released_not_kept(code: int) -> None:
    """A 307 or 308 asks for the same request elsewhere: each repeat runs again, and another
    payload under the key is not refused as a reuse."""
    async with serve(replay_errors=True) as (client, api):
        h = headers(new_key())
        first = await client.post(f"/status/{code}", headers=h)
        second = await client.post(f"/status/{code}", headers=h)
    assert first.status_code == second.status_code == code
    assert not replayed(second)
    assert api.runs[f"/status/{code}"] == 2


@pytest.mark.parametrize("code", [400, 404, 409, 422])
async def test_4xx_answers_are_kept_and_replayed(code: int) -> None:
    """Client errors are outcomes: a retry gets the same 4xx without running."""
    async with serve() as (client, api):
        h = headers(new_key())
        await client.post(f"/status/{code}", headers=h)
        again = await client.post(f"/status/{code}", headers=h)
    assert again.status_code == code
    assert replayed(again)
    assert api.runs[f"/status/{code}"] == 1


@pytest.mark.parametrize("code", [500, 502, 503, 408, 429])
async def test_5xx_408_and_429_release_the_key_so_a_retry_runs(code: int) -> None:
    """Transient failures are not kept: the retry runs the app again."""
    async with serve() as (client, api):
        h = headers(new_key())
        first = await client.post(f"/status/{code}", headers=h)
        again = await client.post(f"/status/{code}", headers=h)
    assert first.status_code == again.status_code == code
    assert not replayed(again)
    assert api.runs[f"/status/{code}"] == 2


async def test_a_new_key_costs_two_store_round_trips_and_a_replay_one() -> None:
    """Claim + complete for a new key; one claim for a replay (no check-then-set)."""
    calls: list[str] = []

    class Counting(AsyncMemoryStore):
        async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
            calls.append("claim")
            return await super().claim(key, fingerprint, lease=lease)

        async def complete(
            self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
        ) -> bool:
            calls.append("complete")
            return await super().complete(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)

        async def release(self, claim: Claimed) -> bool:
            calls.append("release")
            return await super().release(claim)

        async def renew(self, claim: Claimed, *, lease: float) -> bool:
            calls.append("renew")
            return await super().renew(claim, lease=lease)

    async with serve(Counting()) as (client, _):
        h = headers(new_key())
        await client.post("/payments", json=PAYMENT, headers=h)
        assert calls == ["claim", "complete"]
        calls.clear()
        await client.post("/payments", json=PAYMENT, headers=h)
        assert calls == ["claim"]


# The key header ----------------------------------------------------------------------------


async def test_a_missing_key_is_400_and_the_app_does_not_run() -> None:
    """Keys are required by default on protected routes."""
    async with serve() as (client, api):
        response = await client.post("/payments", json=PAYMENT, headers=headers())
    body = problem(response, "missing-idempotency-key", 400)
    assert "Idempotency-Key" in body["detail"]
    assert api.runs["/payments"] == 0


async def test_an_optional_route_without_a_key_runs_unprotected() -> None:
    """Route(required=False): no key, no protection; every request runs."""
    async with serve(routes=[Route("/optional", required=False)]) as (client, api):
        first = await client.post("/optional", json=PAYMENT, headers=headers())
        second = await client.post("/optional", json=PAYMENT, headers=headers())
        h = headers(new_key())
        await client.post("/optional", json=PAYMENT, headers=h)
        keyed = await client.post("/optional", json=PAYMENT, headers=h)
    assert first.status_code == second.status_code == 201
    assert not replayed(second)
    assert replayed(keyed)  # with a key it is protected
    assert api.runs["/optional"] == 3


async def test_required_false_makes_keys_optional_everywhere() -> None:
    """The middleware-wide required=False lets keyless requests through."""
    async with serve(required=False) as (client, api):
        response = await client.post("/payments", json=PAYMENT, headers=headers())
    assert response.status_code == 201
    assert api.runs["/payments"] == 1


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("k" * 256, id="256-chars"),
        pytest.param("a b", id="space"),
        pytest.param('"unterminated\\"', id="bad-escape"),
        pytest.param("", id="empty"),
        pytest.param(b"caf\xc3\xa9", id="non-ascii"),
        pytest.param(b"a\x01b", id="control"),
    ],
)
async def test_a_malformed_key_is_400_and_the_app_does_not_run(value: str | bytes) -> None:
    """Anything but 1-255 visible ASCII characters is refused."""
    raw = value.encode() if isinstance(value, str) else value
    async with serve() as (client, api):
        response = await client.post(
            "/payments", json=PAYMENT, headers=[(b"Idempotency-Key", raw), (b"X-Tenant-Id", b"a")]
        )
    problem(response, "malformed-idempotency-key", 400)
    assert api.runs["/payments"] == 0


@pytest.mark.parametrize("second", ["key-2", "key-1"])
async def test_two_key_headers_are_400(second: str) -> None:
    """Exactly one Idempotency-Key header is allowed, even if both carry the same value."""
    async with serve() as (client, api):
        response = await client.post(
            "/payments",
            json=PAYMENT,
            headers=[
                ("Idempotency-Key", "key-1"),
                ("Idempotency-Key", second),
                ("X-Tenant-Id", "a"),
            ],
        )
    problem(response, "malformed-idempotency-key", 400)
    assert api.runs["/payments"] == 0


async def test_the_quoted_and_the_bare_form_of_a_key_are_one_key() -> None:
    """The sf-string "k" and the token k name the same key."""
    async with serve() as (client, api):
        await client.post("/payments", json=PAYMENT, headers=headers("order-7"))
        again = await client.post("/payments", json=PAYMENT, headers=headers('"order-7"'))
    assert replayed(again)
    assert api.runs["/payments"] == 1


async def test_the_key_header_name_is_configurable() -> None:
    """header= names the header that carries the key."""
    async with serve(header="X-Request-Key") as (client, api):
        h = {"X-Request-Key": new_key(), "X-Tenant-Id": "acme"}
        await client.post("/payments", json=PAYMENT, headers=h)
        again = await client.post("/payments", json=PAYMENT, headers=h)
        missing = await client.post("/payments", json=PAYMENT, headers=headers(new_key()))
    assert replayed(again)
    body = problem(missing, "missing-idempotency-key", 400)
    assert "X-Request-Key" in body["detail"]
    assert api.runs["/payments"] == 1


# Methods and routes ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_a_key_on_other_methods_is_ignored_by_default(method: str) -> None:
    """GET/PUT/DELETE with a key run every time, without error or replay."""
    async with serve() as (client, api):
        h = headers(new_key())
        first = await client.request(method, "/items/1", headers=h)
        second = await client.request(method, "/items/1", headers=h)
    assert first.status_code == second.status_code == 200
    assert not replayed(second)
    assert api.runs["/items/1"] == 2


async def test_methods_option_protects_other_methods() -> None:
    """methods=[...] replaces the default set."""
    async with serve(methods=["PUT"]) as (client, api):
        h = headers(new_key())
        await client.put("/items/1", headers=h)
        again = await client.put("/items/1", headers=h)
        post = await client.post("/items/1", headers=headers())  # POST is no longer protected
    assert replayed(again)
    assert post.status_code == 200
    assert api.runs["/items/1"] == 2


async def test_a_route_with_a_path_parameter_protects_its_methods() -> None:
    """Route('/items/{id}', methods=['PUT']) protects PUT on one path segment only."""
    async with serve(routes=[Route("/items/{id}", methods=["PUT"])]) as (client, api):
        h = headers(new_key())
        await client.put("/items/7", headers=h)
        again = await client.put("/items/7", headers=h)
        other_method = await client.request("DELETE", "/items/7", headers=h)
    assert replayed(again)
    assert not replayed(other_method)
    assert api.runs["/items/7"] == 2


async def test_a_single_star_matches_one_segment_and_a_double_star_any_depth() -> None:
    """'*' is one path segment, '**' anything below."""
    routes = [Route("/items/*", methods=["DELETE"]), Route("/api/**", methods=["PUT"])]
    async with serve(routes=routes) as (client, api):
        h1, h2 = headers(new_key()), headers(new_key())
        await client.delete("/items/3", headers=h1)
        one = await client.delete("/items/3", headers=h1)
        await client.put("/api/v1/things/9", headers=h2)
        deep = await client.put("/api/v1/things/9", headers=h2)
        unkeyed = await client.put("/api/x", headers=headers())
    assert replayed(one)
    assert replayed(deep)
    problem(unkeyed, "missing-idempotency-key", 400)
    assert api.runs["/items/3"] == 1
    assert api.runs["/api/v1/things/9"] == 1


async def test_a_disabled_route_is_left_alone() -> None:
    """Route(enabled=False): no key needed, no replay, even for POST."""
    async with serve(routes=[Route("/off", enabled=False)]) as (client, api):
        h = headers(new_key())
        keyless = await client.post("/off", json=PAYMENT, headers=headers())
        await client.post("/off", json=PAYMENT, headers=h)
        again = await client.post("/off", json=PAYMENT, headers=h)
    assert keyless.status_code == 201
    assert not replayed(again)
    assert api.runs["/off"] == 3


async def test_the_first_matching_route_decides() -> None:
    """Routes are tried in order; a later, broader one does not override an earlier match."""
    routes = [Route("/off", enabled=False), Route("/**")]
    async with serve(routes=routes) as (client, api):
        await client.post("/off", json=PAYMENT, headers=headers())
        refused = await client.post("/payments", json=PAYMENT, headers=headers())
    problem(refused, "missing-idempotency-key", 400)
    assert api.runs["/off"] == 1


async def test_a_route_ttl_ends_its_replay_window_and_leaves_a_tombstone(clock: Clock) -> None:
    """After a route's TTL a repeat is told the answer expired; another payload is still 422."""
    store = AsyncMemoryStore(clock=clock)
    async with serve(store, routes=[Route("/short", ttl=10)]) as (client, api):
        short, long = headers(new_key()), headers(new_key())
        await client.post("/short", json=PAYMENT, headers=short)
        await client.post("/payments", json=PAYMENT, headers=long)
        clock.advance(5)
        within = await client.post("/short", json=PAYMENT, headers=short)
        clock.advance(6)
        expired = await client.post("/short", json=PAYMENT, headers=short)
        other = await client.post("/short", json={"amount": 1}, headers=short)
        default_ttl = await client.post("/payments", json=PAYMENT, headers=long)
    assert replayed(within)
    body = problem(expired, "response-not-replayable", 410)
    assert body["reason"] == "expired"
    problem(other, "idempotency-key-reused", 422)
    assert replayed(default_ttl)
    assert api.runs["/short"] == 1


# Tenants ------------------------------------------------------------------------------------


async def test_the_same_key_under_two_tenants_runs_for_each(store_url: str) -> None:
    """Two tenants' identical keys never meet: each runs once and replays its own answer."""
    async with serve(store_url) as (client, api):
        key = new_key()
        a1 = await client.post("/payments", json=PAYMENT, headers=headers(key, "tenant-a"))
        b1 = await client.post("/payments", json=PAYMENT, headers=headers(key, "tenant-b"))
        a2 = await client.post("/payments", json=PAYMENT, headers=headers(key, "tenant-a"))
        b2 = await client.post("/payments", json=PAYMENT, headers=headers(key, "tenant-b"))
    assert not replayed(a1)
    assert not replayed(b1)
    assert a1.content != b1.content
    assert (a2.content, b2.content) == (a1.content, b1.content)
    assert replayed(a2)
    assert replayed(b2)
    assert api.runs["/payments"] == 2


async def test_another_tenant_may_use_a_key_with_another_payload() -> None:
    """A key is only 'reused' within one tenant."""
    async with serve() as (client, api):
        key = new_key()
        await client.post("/payments", json=PAYMENT, headers=headers(key, "tenant-a"))
        b = await client.post("/payments", json={"x": 1}, headers=headers(key, "tenant-b"))
    assert b.status_code == 201
    assert api.runs["/payments"] == 2


@pytest.mark.parametrize("tenant", [None, "", "   "])
async def test_a_request_without_its_tenant_header_is_400(tenant: str | None) -> None:
    """No tenant, no deduplication: refused before the app runs."""
    async with serve() as (client, api):
        response = await client.post("/payments", json=PAYMENT, headers=headers(new_key(), tenant))
    problem(response, "missing-idempotency-scope", 400)
    assert api.runs["/payments"] == 0


class BearerBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        auth = conn.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(auth.removeprefix("Bearer "))


async def test_tenant_from_principal_separates_authenticated_users() -> None:
    """Behind AuthenticationMiddleware, scope['user'] is the tenant; anonymous requests are 400."""
    api = Api()
    mw = IdempotencyMiddleware(api.app(), store="memory:", tenant=tenant_from_principal())
    app = AuthenticationMiddleware(mw, backend=BearerBackend())
    transport = httpx.ASGITransport(app=app)
    key = new_key()
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        alice = {"Idempotency-Key": key, "Authorization": "Bearer alice"}
        bob = {"Idempotency-Key": key, "Authorization": "Bearer bob"}
        a1 = await client.post("/payments", json=PAYMENT, headers=alice)
        b1 = await client.post("/payments", json=PAYMENT, headers=bob)
        a2 = await client.post("/payments", json=PAYMENT, headers=alice)
        anonymous = await client.post("/payments", json=PAYMENT, headers={"Idempotency-Key": key})
    await mw.aclose()
    assert a1.content != b1.content
    assert a2.content == a1.content
    assert replayed(a2)
    problem(anonymous, "missing-idempotency-scope", 400)
    assert api.runs["/payments"] == 2


async def test_single_tenant_needs_no_tenant_header() -> None:
    """single_tenant puts every request in one scope."""
    async with serve(tenant=single_tenant) as (client, api):
        h = {"Idempotency-Key": new_key()}
        await client.post("/payments", json=PAYMENT, headers=h)
        again = await client.post("/payments", json=PAYMENT, headers=h)
    assert replayed(again)
    assert api.runs["/payments"] == 1


async def test_nothing_secret_and_no_raw_key_reaches_the_store(tmp_path: Path) -> None:
    """Authorization, cookies, the tenant value and the raw key never appear in the store."""
    db = tmp_path / "secrets.db"
    key = "raw-client-key-4f1d9c"
    async with serve(f"sqlite:{db}") as (client, _):
        h = {
            **headers(key, "tenant-value-77a"),
            "Authorization": "Bearer s3cret-token",
            "Cookie": "session=s3cret-cookie-in",
        }
        await client.post("/payments", json=PAYMENT, headers=h)
        again = await client.post("/payments", json=PAYMENT, headers=h)
    assert replayed(again)
    stored = files_bytes(tmp_path, db.name)  # the database and its journal files
    assert b"pay_1" in stored  # the answer is there...
    for secret in (b"s3cret", b"tenant-value-77a", key.encode(), b"Set-Cookie", b"set-cookie"):
        assert secret not in stored  # ...and nothing else of the exchange


# Bodies -------------------------------------------------------------------------------------


async def test_a_request_body_over_the_limit_by_content_length_is_413() -> None:
    """A declared Content-Length over max_request_body is refused before reading."""
    async with serve(max_request_body=100) as (client, api):
        response = await client.post("/echo", content=b"x" * 101, headers=headers(new_key()))
        at_limit = await client.post("/echo", content=b"x" * 100, headers=headers(new_key()))
    body = problem(response, "request-too-large", 413)
    assert body["max_bytes"] == 100
    assert at_limit.status_code == 200
    assert api.runs["/echo"] == 1


async def test_a_chunked_request_body_over_the_limit_is_413() -> None:
    """Without Content-Length, the body is counted as it streams in."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 30

    async with serve(max_request_body=100) as (client, api):
        response = await client.post("/echo", content=chunks(), headers=headers(new_key()))
    assert "content-length" not in response.request.headers
    problem(response, "request-too-large", 413)
    assert api.runs["/echo"] == 0


async def test_the_request_body_reaches_the_app_unchanged() -> None:
    """The middleware reads the body once and hands the same bytes on (not canonicalized)."""
    raw = b'{ "b" : 1,\n "a" : [1.0, "\\u00e9"] }'
    binary = bytes(range(256)) * 3
    async with serve() as (client, api):
        j = await client.post(
            "/echo", content=raw, headers={**headers(new_key()), "content-type": "application/json"}
        )
        b = await client.post(
            "/echo",
            content=binary,
            headers={**headers(new_key()), "content-type": "application/octet-stream"},
        )
    assert api.received == [raw, binary]
    assert j.content == raw
    assert b.content == binary


async def test_a_chunked_request_body_reaches_the_app_whole() -> None:
    """A body streamed in pieces arrives at the app as all its bytes, in order."""
    parts = [b"alpha-", b"", b"beta-", bytes(range(256)), b"-omega"]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with serve() as (client, api):
        h = headers(new_key())
        response = await client.post("/echo", content=chunks(), headers=h)
        again = await client.post("/echo", content=b"".join(parts), headers=h)
    assert api.received == [b"".join(parts)]
    assert response.content == b"".join(parts)
    assert replayed(again)  # chunked or not, the same bytes are the same request


async def test_a_response_over_the_storage_limit_reaches_the_client_but_is_not_replayed() -> None:
    """The first client gets every byte; a repeat is told the operation completed (410)."""
    async with serve(max_response_body=1000, api=Api(big=5000)) as (client, api):
        h = headers(new_key())
        first = await client.post("/big", headers=h)
        second = await client.post("/big", headers=h)
    assert first.status_code == 201
    assert first.content == b"x" * 5000
    body = problem(second, "response-not-replayable", 410)
    assert body["original_status"] == 201
    assert body["location"] == "/reports/1"
    assert api.runs["/big"] == 1


async def test_a_response_at_the_storage_limit_is_replayed() -> None:
    """max_response_body is inclusive."""
    async with serve(max_response_body=1000, api=Api(big=1000)) as (client, api):
        h = headers(new_key())
        await client.post("/big", headers=h)
        again = await client.post("/big", headers=h)
    assert replayed(again)
    assert again.content == b"x" * 1000
    assert api.runs["/big"] == 1


async def test_a_streaming_response_is_captured_and_replayed(store_url: str) -> None:
    """A StreamingResponse goes out as produced and is replayed whole."""
    async with serve(store_url) as (client, api):
        h = headers(new_key())
        first = await client.post("/stream", headers=h)
        second = await client.post("/stream", headers=h)
    expected = b"".join(f"chunk-{i};".encode() for i in range(5))
    assert first.content == second.content == expected
    assert second.headers["content-type"].startswith("text/plain")
    assert replayed(second)
    assert api.runs["/stream"] == 1


async def test_response_chunks_reach_the_client_before_the_app_finishes() -> None:
    """The response is streamed, not buffered: the client has chunk 1 while the app still runs."""
    client_has_first_chunk = asyncio.Event()

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one,", "more_body": True})
        # Deadlock guard only: with a buffering middleware this never gets set.
        await asyncio.wait_for(client_has_first_chunk.wait(), timeout=5)
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant)
    sent: list[ASGIMessage] = []

    async def send(message: ASGIMessage) -> None:
        sent.append(message)
        if message.get("body") == b"one,":
            client_has_first_chunk.set()

    await mw(http_scope(), receive_body(b""), send)
    assert [m.get("body") for m in sent[1:]] == [b"one,", b"two"]

    again: list[ASGIMessage] = []
    await mw(http_scope(), receive_body(b""), collect(again))
    assert again[0]["status"] == 200
    assert (b"idempotent-replayed", b"true") in again[0]["headers"]
    assert again[1]["body"] == b"one,two"
    await mw.aclose()


# Failures of the app ------------------------------------------------------------------------


async def test_an_app_exception_releases_the_key_and_the_retry_runs() -> None:
    """The client gets the framework's 500 in full; the key is free for a retry."""
    async with serve(raise_app_exceptions=False) as (client, api):
        h = headers(new_key())
        first = await client.post("/fail", headers=h)
        second = await client.post("/fail", headers=h)
    assert first.status_code == second.status_code == 500
    assert first.content == b"Internal Server Error"
    assert not replayed(second)
    assert api.runs["/fail"] == 2


async def test_an_app_exception_propagates_to_the_server() -> None:
    """The middleware re-raises the app's error so the server logs it."""
    async with serve() as (client, _):
        with pytest.raises(RuntimeError, match="the handler failed"):
            await client.post("/fail", headers=headers(new_key()))


async def test_replay_errors_replays_5xx_answers() -> None:
    """replay_errors=True keeps a 503 and replays it; the app runs once."""
    async with serve(replay_errors=True) as (client, api):
        h = headers(new_key())
        first = await client.post("/status/503", headers=h)
        second = await client.post("/status/503", headers=h)
    assert first.status_code == second.status_code == 503
    assert replayed(second)
    assert second.content == first.content
    assert api.runs["/status/503"] == 1


async def test_replay_errors_keeps_an_app_exception() -> None:
    """replay_errors=True: an exception is kept too; the retry gets the same 500, no rerun."""
    async with serve(replay_errors=True, raise_app_exceptions=False) as (client, api):
        h = headers(new_key())
        first = await client.post("/fail", headers=h)
        second = await client.post("/fail", headers=h)
    assert first.status_code == second.status_code == 500
    assert second.content == first.content
    assert replayed(second)
    assert api.runs["/fail"] == 1


async def test_replay_errors_stores_a_500_problem_for_an_exception_before_any_response() -> None:
    """A bare ASGI app raising before it answers: the client gets a 500 problem, kept."""
    runs = 0

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("secret internals")

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant, replay_errors=True)
    first: list[ASGIMessage] = []
    with pytest.raises(RuntimeError):
        await mw(http_scope(), receive_body(b""), collect(first))
    second: list[ASGIMessage] = []
    await mw(http_scope(), receive_body(b""), collect(second))
    await mw.aclose()
    assert first[0]["status"] == second[0]["status"] == 500
    assert (b"content-type", b"application/problem+json") in first[0]["headers"]
    assert first[1]["body"] == second[1]["body"]
    assert b"secret" not in first[1]["body"]
    assert runs == 1


async def test_a_failing_background_task_after_a_success_keeps_the_success() -> None:
    """The client got a whole 201 before the error: it gets it in full, and it is replayed."""
    async with serve(raise_app_exceptions=False) as (client, api):
        h = headers(new_key())
        first = await client.post("/background", headers=h)
        second = await client.post("/background", headers=h)
    assert first.status_code == 201
    assert first.json() == {"id": "pay_bg"}
    assert second.status_code == 201
    assert replayed(second)
    assert second.content == first.content
    assert api.runs["/background"] == 1


async def test_an_app_that_returns_without_answering_releases_the_key() -> None:
    """No response at all is a failure: the key is released, and the error is raised."""
    runs = 0

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="without completing a response"):
            await mw(http_scope(), receive_body(b""), collect([]))
    await mw.aclose()
    assert runs == 2


# Store trouble ----------------------------------------------------------------------------


class BrokenStore(AsyncMemoryStore):
    """A store whose every operation fails as the given error, or never answers."""

    in_process = False  # it may hang: the middleware must time it out

    def __init__(self, error: BaseException | None) -> None:
        super().__init__()
        self.error = error

    async def _fail(self) -> Any:
        if self.error is None:
            await asyncio.Event().wait()
        raise self.error  # type: ignore[misc]

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        result: Claimed | Existing = await self._fail()
        return result

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        return bool(await self._fail())

    async def release(self, claim: Claimed) -> bool:
        return bool(await self._fail())

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        return bool(await self._fail())


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(StoreUnavailable("connection refused"), id="unavailable"),
        pytest.param(ConnectionRefusedError("refused"), id="os-error"),
        pytest.param(None, id="hangs"),
    ],
)
async def test_a_store_that_cannot_be_reached_is_503_and_the_app_does_not_run(
    error: BaseException | None,
) -> None:
    """Fail closed: no claim, no run; 503 with Retry-After, and nothing of the cause leaks."""
    async with serve(BrokenStore(error), store_timeout=0.05, retry_after=7) as (client, api):
        response = await client.post("/payments", json=PAYMENT, headers=headers(new_key()))
    body = problem(response, "idempotency-store-unavailable", 503)
    assert response.headers["retry-after"] == "7"
    assert "refused" not in body["detail"]
    assert api.runs["/payments"] == 0


async def test_fail_open_runs_the_app_when_the_store_is_down() -> None:
    """fail_open=True (unsafe): the app runs unprotected, every time."""
    store = BrokenStore(StoreUnavailable("down"))
    async with serve(store, fail_open=True) as (client, api):
        h = headers(new_key())
        first = await client.post("/payments", json=PAYMENT, headers=h)
        second = await client.post("/payments", json=PAYMENT, headers=h)
    assert first.status_code == second.status_code == 201
    assert not replayed(second)
    assert api.runs["/payments"] == 2


async def test_a_store_that_fails_after_the_run_still_answers_the_client() -> None:
    """The app ran: its answer goes out even if it cannot be stored (after store_timeout, while
    the write is tried again until the lease ends)."""

    class FailsOnComplete(AsyncMemoryStore):
        async def complete(
            self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
        ) -> bool:
            raise StoreUnavailable("down after the claim")

        async def renew(self, claim: Claimed, *, lease: float) -> bool:
            raise StoreUnavailable("down after the claim")  # so the lease, and the tries, end

    store = FailsOnComplete()
    async with serve(store, store_timeout=0.05, lease=0.5) as (client, api):
        response = await client.post("/payments", json=PAYMENT, headers=headers(new_key()))
    assert response.status_code == 201
    assert response.json()["id"] == "pay_1"
    assert api.runs["/payments"] == 1


# Other scopes -----------------------------------------------------------------------------


async def test_websocket_scopes_pass_straight_through() -> None:
    """Websocket scopes reach the app untouched, with the same receive/send."""
    seen: list[tuple[ASGIMessage, Any, Any]] = []

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant)
    scope: ASGIMessage = {"type": "websocket", "headers": [(b"idempotency-key", b"k")]}
    receive, send = receive_body(b""), collect([])
    await mw(scope, receive, send)
    await mw.aclose()
    assert seen == [(scope, receive, send)]


async def test_the_lifespan_reaches_the_app_with_every_message() -> None:
    """The app gets the lifespan scope, every message it is sent and the same send."""
    seen: list[Any] = []
    sent: list[ASGIMessage] = []

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        seen.append((scope, send))
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "lifespan.shutdown.complete"})

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant)
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> ASGIMessage:
        return next(messages)

    scope: ASGIMessage = {"type": "lifespan"}
    send = collect(sent)
    await mw(scope, receive, send)
    await mw.aclose()
    assert seen == [(scope, send), {"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    assert sent == [{"type": "lifespan.shutdown.complete"}]


async def test_a_client_that_disconnects_while_sending_its_body_gets_nothing_run() -> None:
    """A request cut off before its body is complete neither runs nor holds its key."""
    runs = 0

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages: Iterator[ASGIMessage] = iter(
        [
            {"type": "http.request", "body": b"part", "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def cut_off() -> ASGIMessage:
        return next(messages)

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant)
    sent: list[ASGIMessage] = []
    await mw(http_scope(), cut_off, collect(sent))
    again: list[ASGIMessage] = []
    await mw(http_scope(), receive_body(b"part"), collect(again))
    await mw.aclose()
    assert sent == []
    assert runs == 1
    assert again[0]["status"] == 201


async def test_extensions_that_bypass_the_body_are_hidden_from_the_app() -> None:
    """The app never sees pathsend/zerocopy, which would send a body that cannot be captured."""
    seen: list[dict[str, Any]] = []

    async def app(scope: ASGIMessage, receive: Any, send: Any) -> None:
        seen.append(dict(scope.get("extensions", {})))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = IdempotencyMiddleware(app, store="memory:", tenant=single_tenant)
    scope = http_scope()
    scope["extensions"] = {"http.response.pathsend": {}, "http.response.zerocopy": {}, "x": {}}
    await mw(scope, receive_body(b""), collect([]))
    await mw.aclose()
    assert seen == [{"x": {}}]


# Every error is a problem ---------------------------------------------------------------------


async def test_every_error_the_middleware_sends_is_a_problem_document() -> None:
    """400, 409, 413, 422 and 503 answers are application/problem+json with stable types."""
    api, gate = Api(), asyncio.Event()
    api.gate = gate
    async with serve(api=api, max_request_body=10) as (client, _):
        k = new_key()
        first = asyncio.create_task(client.post("/payments", content=b"{}", headers=headers(k)))
        await api.running.wait()  # the first request holds its key until the gate opens
        answers = {
            "missing-idempotency-key": await client.post("/payments", headers=headers()),
            "malformed-idempotency-key": await client.post("/payments", headers=headers("a b")),
            "missing-idempotency-scope": await client.post(
                "/payments", headers=headers(new_key(), None)
            ),
            "idempotency-key-in-flight": await client.post(
                "/payments", content=b"{}", headers=headers(k)
            ),
            "request-too-large": await client.post(
                "/payments", content=b"x" * 11, headers=headers(new_key())
            ),
        }
        gate.set()
        await first
        answers["idempotency-key-reused"] = await client.post(
            "/payments", content=b"[]", headers=headers(k)
        )
    async with serve(BrokenStore(StoreUnavailable("x"))) as (client, _):
        answers["idempotency-store-unavailable"] = await client.post(
            "/payments", headers=headers(new_key())
        )
    statuses = {
        "missing-idempotency-key": 400,
        "malformed-idempotency-key": 400,
        "missing-idempotency-scope": 400,
        "idempotency-key-in-flight": 409,
        "request-too-large": 413,
        "idempotency-key-reused": 422,
        "idempotency-store-unavailable": 503,
    }
    for slug, response in answers.items():
        problem(response, slug, statuses[slug])
        assert response.headers["cache-control"] == "no-store"
        assert int(response.headers["content-length"]) == len(response.content)
    assert answers["idempotency-key-in-flight"].headers["retry-after"] == "1"


# Concurrency ------------------------------------------------------------------------------


async def test_50_concurrent_duplicates_run_the_handler_exactly_once(store_url: str) -> None:
    """Every duplicate gets 409 (still running) or the replay; none runs, none is 5xx."""
    async with serve(store_url, api=Api(delay=0.2)) as (client, api):
        h = headers(new_key())
        answers = await asyncio.gather(
            *(client.post("/payments", json=PAYMENT, headers=h) for _ in range(50))
        )
    assert api.runs["/payments"] == 1
    fresh = [a for a in answers if a.status_code == 201 and not replayed(a)]
    assert len(fresh) == 1
    for answer in answers:
        if answer is fresh[0]:
            continue
        if answer.status_code == 409:
            problem(answer, "idempotency-key-in-flight", 409)
            assert "retry-after" in answer.headers
        else:
            assert replayed(answer)
            assert answer.content == fresh[0].content


async def test_with_wait_concurrent_duplicates_get_the_replay_instead_of_409() -> None:
    """wait= lets duplicates poll until the first completes, then replay its answer."""
    async with serve(api=Api(delay=0.2), wait=5) as (client, api):
        h = headers(new_key())
        answers = await asyncio.gather(
            *(client.post("/payments", json=PAYMENT, headers=h) for _ in range(10))
        )
    assert api.runs["/payments"] == 1
    assert {a.status_code for a in answers} == {201}
    assert {a.content for a in answers} == {answers[0].content}
    assert sum(replayed(a) for a in answers) == 9


async def test_a_route_wait_overrides_the_default() -> None:
    """Route(wait=...) turns waiting on for one path."""
    routes = [Route("/payments", wait=5)]
    async with serve(api=Api(delay=0.2), routes=routes) as (client, api):
        h = headers(new_key())
        answers = await asyncio.gather(
            *(client.post("/payments", json=PAYMENT, headers=h) for _ in range(3))
        )
    assert {a.status_code for a in answers} == {201}
    assert api.runs["/payments"] == 1


async def test_the_lease_is_renewed_while_the_app_runs() -> None:
    """A run longer than its lease keeps its key: a duplicate after the lease still gets 409."""
    async with serve(api=Api(delay=1.2), lease=0.3) as (client, api):
        h = headers(new_key())
        first = asyncio.create_task(client.post("/payments", json=PAYMENT, headers=h))
        await asyncio.sleep(0.8)  # well past the 0.3 s lease: only renewal keeps the claim
        duplicate = await client.post("/payments", json=PAYMENT, headers=h)
        original = await first
    problem(duplicate, "idempotency-key-in-flight", 409)
    assert original.status_code == 201
    assert api.runs["/payments"] == 1


# Raw ASGI helpers -------------------------------------------------------------------------


def http_scope(method: str = "POST", path: str = "/raw") -> ASGIMessage:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"idempotency-key", b"raw-key-1")],
    }


def receive_body(body: bytes) -> Any:
    given = False

    async def receive() -> ASGIMessage:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


def collect(into: list[ASGIMessage]) -> Any:
    async def send(message: ASGIMessage) -> None:
        into.append(message)

    return send


async def test_single_tenant_may_be_passed_called_or_not() -> None:
    """tenant=single_tenant() is the same tenant as tenant=single_tenant."""
    assert single_tenant() is single_tenant
    async with serve(tenant=single_tenant()) as (client, api):
        h = {"Idempotency-Key": new_key()}
        first = await client.post("/payments", json=PAYMENT, headers=h)
        again = await client.post("/payments", json=PAYMENT, headers=h)
    assert first.status_code == 201
    assert replayed(again)
    assert api.runs["/payments"] == 1


class CompleteFailsOnce(AsyncMemoryStore):
    """A store whose first complete fails after it was written (its reply lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.completes = 0

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        self.completes += 1
        done = await super().complete(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)
        if self.completes == 1:
            raise StoreUnavailable("connection reset after the write")
        return done


async def test_a_complete_whose_reply_was_lost_is_retried_and_the_answer_kept() -> None:
    """One store blip after the app ran neither loses the answer nor runs the app again."""
    store = CompleteFailsOnce()
    async with serve(store) as (client, api):
        h = headers(new_key())
        first = await client.post("/payments", json=PAYMENT, headers=h)
        again = await client.post("/payments", json=PAYMENT, headers=h)
    assert first.status_code == 201
    assert replayed(again)
    assert again.content == first.content
    assert store.completes == 2
    assert api.runs["/payments"] == 1
