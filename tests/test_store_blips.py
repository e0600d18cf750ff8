"""A store blip after the app ran must not cost a second run, in process (the middleware and a
memory store whose operations fail when the test says so).

The key is the request's for its whole lease: a write after the app (complete, release, a
checkpoint) that fails is tried again until it lands or the lease ends; the client gets its
answer once the record is stored, or after ``store_timeout`` while the write goes on in the
background. The same with real servers and a real proxy: ``tests/realserver/test_store_outage.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from oncely import Claimed, Existing, State, StoredResponse, current_attempt, storage_key
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import AsyncMemoryStore

from .test_asgi import PAYMENT, TENANT, Api, headers, new_key, problem, replayed

OPS = ("claim", "complete", "release", "renew", "record_phase")


class FlakyStore(AsyncMemoryStore):
    """A memory store whose operations fail while the test says so.

    ``down``: the operations failing now, each call raising ``error()``; ``fail_next[op]``: how
    many of the next calls of ``op`` fail (then it works again). ``calls`` counts every call.
    """

    in_process = False

    def __init__(self, error: Callable[[], Exception] | None = None) -> None:
        super().__init__()
        self.down: set[str] = set()
        self.fail_next: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.error = error or (lambda: ConnectionResetError("connection reset by peer"))

    def _check(self, op: str) -> None:
        self.calls[op] += 1
        if op in self.down:
            raise self.error()
        if self.fail_next[op] > 0:
            self.fail_next[op] -= 1
            raise self.error()

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        self._check("claim")
        return await super().claim(key, fingerprint, lease=lease)

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        self._check("complete")
        return await super().complete(claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)

    async def release(self, claim: Claimed) -> bool:
        self._check("release")
        return await super().release(claim)

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        self._check("renew")
        return await super().renew(claim, lease=lease)

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        self._check("record_phase")
        return await super().record_phase(claim, name, data)


@asynccontextmanager
async def serving(
    store: AsyncMemoryStore, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Api, IdempotencyMiddleware]]:
    """A client for the test API behind the middleware (yielded too); closed afterwards."""
    api = Api()
    mw = IdempotencyMiddleware(api.app(), store=store, tenant=TENANT, **options)
    transport = httpx.ASGITransport(app=mw, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client, api, mw
    finally:
        await mw.aclose()


def skey(key: str) -> str:
    return storage_key("acme", key)


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def state_of(store: AsyncMemoryStore, key: str) -> State | None:
    record = await store.get(skey(key))
    return None if record is None else record.state


# Completion -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(lambda: ConnectionResetError("reset"), id="os-error"),
        # What redis-py raises under uvloop on a transport closed under it.
        pytest.param(
            lambda: RuntimeError("unable to perform operation on <TCPTransport closed=True>"),
            id="closed-transport",
        ),
        pytest.param(lambda: ValueError("garbled reply"), id="any-exception"),
    ],
)
async def test_a_completion_that_fails_a_few_times_is_retried_before_the_client_is_answered(
    error: Callable[[], Exception],
) -> None:
    """Whatever the store raises, a short blip is waited out: the client is answered once the
    record is stored, every repeat is its replay, and the app ran once."""
    store = FlakyStore(error)
    store.fail_next["complete"] = 3
    async with serving(store, store_timeout=5, lease=10) as (client, api, _mw):
        key = new_key()
        first = await client.post("/payments", json=PAYMENT, headers=headers(key))
        assert await state_of(store, key) is State.COMPLETED  # stored before the answer
        again = await client.post("/payments", json=PAYMENT, headers=headers(key))
    assert first.status_code == 201
    assert store.calls["complete"] == 4
    assert replayed(again)
    assert again.content == first.content
    assert api.runs["/payments"] == 1


async def test_an_outage_past_store_timeout_answers_the_client_and_the_write_lands_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client gets its whole answer after store_timeout; a repeat meanwhile is 409 in
    flight; once the store is back the outcome lands and every repeat is its replay."""
    caplog.set_level(logging.WARNING, logger="oncely")
    store = FlakyStore()
    store.down.add("complete")
    async with serving(store, store_timeout=0.1, lease=10) as (client, api, mw):
        key = new_key()
        started = time.monotonic()
        first = await client.post("/payments", json=PAYMENT, headers=headers(key))
        answered = time.monotonic() - started
        assert len(mw.writes) == 1
        meanwhile = await client.post("/payments", json=PAYMENT, headers=headers(key))
        store.down.clear()
        await until(lambda: len(mw.writes) == 0)
        again = await client.post("/payments", json=PAYMENT, headers=headers(key))
    assert first.status_code == 201
    assert first.json()["id"] == "pay_1"
    assert answered < 5  # after store_timeout, not after the outage
    problem(meanwhile, "idempotency-key-in-flight", 409)
    assert replayed(again)
    assert again.content == first.content
    assert api.runs["/payments"] == 1
    logged = caplog.text
    assert "still being written" in logged
    assert "wrote the completion of key" in logged


async def test_renewals_that_get_through_extend_the_time_a_completion_is_retried() -> None:
    """The app used most of its lease (0.5 of 0.6 s) and then only the completion fails, for
    longer than what was left of the lease: the renewals that get through keep the key, so the
    write is still tried, and lands, past the first lease's end."""
    store = FlakyStore()
    store.down.add("complete")
    api = Api(delay=0.5)
    mw = IdempotencyMiddleware(api.app(), store=store, tenant=TENANT, store_timeout=0.05, lease=0.6)
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        key = new_key()
        started = time.monotonic()
        first = await client.post("/payments", json=PAYMENT, headers=headers(key))
        await asyncio.sleep(max(0.0, started + 0.9 - time.monotonic()))  # past the first lease
        store.down.clear()
        await until(lambda: len(mw.writes) == 0)
        again = await client.post("/payments", json=PAYMENT, headers=headers(key))
    await mw.aclose()
    assert first.status_code == 201
    assert store.calls["renew"] >= 3
    assert replayed(again)
    assert api.runs["/payments"] == 1


async def test_a_store_that_renews_but_keeps_refusing_the_write_is_given_up_after_a_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Renewals get through, the completion never does (a value the store will not take): the
    retries end after one lease, so the key is not held for ever."""
    caplog.set_level(logging.WARNING, logger="oncely")
    store = FlakyStore()
    store.down.add("complete")
    async with serving(store, store_timeout=0.05, lease=0.5) as (client, _api, mw):
        first = await client.post("/payments", json=PAYMENT, headers=headers(new_key()))
        started = time.monotonic()
        await asyncio.wait_for(mw.drain(), 5)
        waited = time.monotonic() - started
    assert first.status_code == 201
    assert waited < 1.5
    assert store.calls["renew"] >= 1
    assert "abandoned the completion of key" in caplog.text


async def test_the_outcome_is_abandoned_when_the_lease_ends_and_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage longer than the lease is the limit: the write is given up when the lease
    ends (logged as such), and the key is left to its lease."""
    caplog.set_level(logging.WARNING, logger="oncely")
    store = FlakyStore()
    store.down.update({"complete", "renew"})
    async with serving(store, store_timeout=0.05, lease=0.4) as (client, _api, mw):
        key = new_key()
        first = await client.post("/payments", json=PAYMENT, headers=headers(key))
        started = time.monotonic()
        await mw.drain()
        waited = time.monotonic() - started
    assert first.status_code == 201
    assert waited < 2  # bounded by the lease
    assert await state_of(store, key) is State.IN_FLIGHT
    assert "abandoned the completion of key" in caplog.text
    assert "the lease ends" in caplog.text


async def test_the_outcome_is_abandoned_at_once_when_another_claim_owns_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renewal that finds another owner ends the retries: the write is fenced anyway."""
    caplog.set_level(logging.WARNING, logger="oncely")
    store = FlakyStore()
    store.down.add("complete")
    lease = 0.6
    async with serving(store, store_timeout=0.05, lease=lease) as (client, _api, mw):
        key = new_key()
        first = await client.post("/payments", json=PAYMENT, headers=headers(key))
        record = await store.get(skey(key))
        assert record is not None
        # Another process took the key over (its lease ran out there, say).
        store.sync._records[record.key] = dataclasses.replace(record, token="another-owner")
        started = time.monotonic()
        await mw.drain()
        waited = time.monotonic() - started
    assert first.status_code == 201
    assert waited < lease  # the renewal told it, before the lease would have ended
    assert "abandoned the completion of key" in caplog.text
    assert "its lease was lost" in caplog.text


# Release ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/status/503", "/fail"])
async def test_a_release_after_an_error_is_retried_so_a_retry_runs_at_once(path: str) -> None:
    """A 5xx or an exception frees the key even through a blip: the retry runs again right
    away instead of waiting out the lease."""
    store = FlakyStore()
    store.fail_next["release"] = 2
    async with serving(store, store_timeout=5, lease=30) as (client, api, _mw):
        key = new_key()
        await client.post(path, headers=headers(key))
        assert await state_of(store, key) is None  # released before the answer
        second = await client.post(path, headers=headers(key))
    assert second.status_code in (500, 503)
    assert store.calls["release"] == 4
    assert api.runs[path] == 2


# Checkpoints ------------------------------------------------------------------------------


async def test_a_checkpoint_is_retried_through_a_blip() -> None:
    """A recovery point written after the phase committed is not lost to a blip."""
    runs: Counter[str] = Counter()

    async def pay(request: Request) -> Response:
        runs["pay"] += 1
        attempt = current_attempt()
        if not attempt.done("created"):
            await attempt.checkpoint("created", {"id": "pay_1"})
        return JSONResponse(attempt.data("created"), status_code=201)

    store = FlakyStore()
    store.fail_next["record_phase"] = 3
    app = Starlette(routes=[StarletteRoute("/pay", pay, methods=["POST"])])
    mw = IdempotencyMiddleware(app, store=store, tenant=TENANT, store_timeout=5, lease=30)
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        key = new_key()
        first = await client.post("/pay", headers=headers(key))
    await mw.aclose()
    record = await store.get(skey(key))
    assert first.status_code == 201
    assert record is not None
    assert record.phases == (("created", '{"id":"pay_1"}'),)
    assert store.calls["record_phase"] == 4
    assert runs["pay"] == 1


# Shutdown and bounds ----------------------------------------------------------------------


async def test_lifespan_shutdown_waits_for_the_writes_in_the_background() -> None:
    """The app hears of shutdown only once the outcome written in the background has landed."""
    store = FlakyStore()
    store.down.add("complete")
    api = Api()
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.shutdown":
                    events.append(f"state {await state_of(store, key)}")
                    return
        await api.app()(scope, receive, send)

    mw = IdempotencyMiddleware(app, store=store, tenant=TENANT, store_timeout=0.05, lease=30)
    transport = httpx.ASGITransport(app=mw)
    key = new_key()
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        first = await client.post("/payments", json=PAYMENT, headers=headers(key))
    assert first.status_code == 201
    assert len(mw.writes) == 1

    shutdown = asyncio.Event()

    async def receive() -> dict[str, str]:
        if not events:
            return {"type": "lifespan.startup"}
        await shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: Any) -> None:
        pass

    lifespan = asyncio.ensure_future(mw({"type": "lifespan"}, receive, send))
    await until(lambda: events == ["lifespan.startup"])
    shutdown.set()
    await asyncio.sleep(0.2)
    assert events == ["lifespan.startup"]  # shutdown held back: the write is still going on
    store.down.clear()
    await asyncio.wait_for(lifespan, 5)
    await mw.aclose()
    assert events == ["lifespan.startup", "lifespan.shutdown", "state completed"]


async def test_past_the_bound_on_background_writes_a_request_waits_for_its_own() -> None:
    """With the background full, the next answer waits until its own outcome is stored."""
    store = FlakyStore()
    store.down.add("complete")
    async with serving(store, store_timeout=0.05, lease=30) as (client, _api, mw):
        mw.writes.limit = 1
        first = await client.post("/payments", json=PAYMENT, headers=headers(new_key()))
        assert len(mw.writes) == 1
        second_key = new_key()
        second = asyncio.ensure_future(
            client.post("/payments", json=PAYMENT, headers=headers(second_key))
        )
        await asyncio.sleep(0.3)
        assert not second.done()  # past store_timeout, still waiting: the background is full
        store.down.clear()
        answer = await asyncio.wait_for(second, 5)
        assert await state_of(store, second_key) is State.COMPLETED
    assert first.status_code == answer.status_code == 201
