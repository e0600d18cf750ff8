"""Every surface reports each decision once, with the same outcome in its hook events, its
metrics and its log lines, and never the raw key, tenant or credentials."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute

from oncely import (
    Claimed,
    Existing,
    LeaseLost,
    Route,
    StoreUnavailable,
    asgi,
    idempotent,
    tenant_from_header,
    wsgi,
)
from oncely.events import Decision, InFlightKey, StoreStats
from oncely.logs import JSONFormatter
from oncely.metrics import Metrics
from oncely.stores.memory import AsyncMemoryStore, MemoryStore

KEY = "raw-key-7f3c9a"
TENANT = "sk_live_tenant_secret_42"
AUTH = "Bearer token-very-secret-99"
# What happens, in order: a new key, its replay, another payload under it, a duplicate while a
# slow first request holds its key, the store down; then the slow first request finishes.
SCENARIO = [
    "executed",
    "replayed",
    "payload_mismatch",
    "in_flight",
    "store_unavailable",
    "executed",
]


class DownStore(MemoryStore):
    """A memory store whose claims fail while ``down`` (a store outage)."""

    kind = "memory"  # what events and metrics call this store
    down = False

    def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        if self.down:
            raise StoreUnavailable("connection refused")
        return super().claim(key, fingerprint, lease=lease)

    def stats(self, *, limit: int = 20) -> StoreStats:
        flying = [r for r in self._records.values() if r.state == "in_flight"]
        keys = tuple(InFlightKey(r.key[:16], r.attempt, 0.0) for r in flying[:limit])
        return StoreStats(len(flying), 0, 0, 0, in_flight_keys=keys)


class AsyncDownStore(AsyncMemoryStore):
    kind = "memory"  # what events and metrics call this store
    down = False

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        if self.down:
            raise StoreUnavailable("connection refused")
        return await super().claim(key, fingerprint, lease=lease)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every oncely log line, as JSON, at INFO."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("oncely")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(old)


def decision_lines(out: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == "oncely.decisions"]


def check_everything(
    events: list[Decision],
    registry: CollectorRegistry,
    out: io.StringIO,
    *,
    route: str,
    surface: str,
) -> None:
    assert [e.outcome for e in events] == SCENARIO
    assert {e.route for e in events} == {route}
    assert {e.surface for e in events} == {surface}
    executed, replayed = events[0], events[1]
    assert executed.attempt == 1
    assert executed.response_size == replayed.response_size
    assert executed.response_size is not None
    assert executed.response_size > 0
    assert [op.name for op in executed.operations] == ["claim", "complete"]
    assert [op.failed for op in events[4].operations] == [True]
    assert executed.key_hash is not None
    assert len(executed.key_hash) == 16
    assert len({e.key_hash for e in events[:3]}) == 1
    assert events[0].tenant_hash is not None
    for outcome in SCENARIO:
        value = registry.get_sample_value(
            "oncely_decisions_total", {"outcome": outcome, "route": route, "surface": surface}
        )
        assert value == SCENARIO.count(outcome), outcome
    claims = registry.get_sample_value(
        "oncely_store_operation_duration_seconds_count", {"store": "memory", "operation": "claim"}
    )
    assert claims == 6.0
    assert registry.get_sample_value(
        "oncely_stored_response_size_bytes_count", {"surface": surface}
    )
    assert registry.get_sample_value("oncely_hook_failures_total") == 6.0
    lines = decision_lines(out)
    assert [line["outcome"] for line in lines] == SCENARIO
    for line, event in zip(lines, events, strict=True):
        assert line["route"] == route
        assert line["key_hash"] == event.key_hash
        assert line["tenant_hash"] == event.tenant_hash
        assert line["attempt"] == event.attempt
        assert line["duration"] > 0
    text = out.getvalue()
    for secret in (KEY, TENANT, AUTH, "token-very-secret", '"amount"'):
        assert secret not in text, secret
    assert "the on_decision hook" in text  # a failing hook is logged, never raised


def failing(decision: Decision) -> None:
    raise RuntimeError("this hook is broken")


async def test_asgi_reports_each_decision_once(captured: io.StringIO) -> None:
    """ASGI: a new key, its replay, another payload, a duplicate in flight, the store down."""
    gate, entered = asyncio.Event(), asyncio.Event()

    async def pay(request: StarletteRequest) -> JSONResponse:
        body = await request.json()
        if body.get("slow"):
            entered.set()
            await gate.wait()
        return JSONResponse({"id": request.path_params["id"], "ok": True}, status_code=201)

    events: list[Decision] = []

    async def record(decision: Decision) -> None:
        events.append(decision)

    registry = CollectorRegistry()
    store = AsyncDownStore()
    metrics = Metrics(registry=registry)
    app = asgi.IdempotencyMiddleware(
        Starlette(routes=[StarletteRoute("/payments/{id}", pay, methods=["POST"])]),
        store=store,
        tenant=tenant_from_header("X-Api-Key"),
        on_decision=[record, metrics, failing],
    )
    h = {"idempotency-key": KEY, "x-api-key": TENANT, "authorization": AUTH}
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/payments/1", headers=h, json={"amount": 5})).status_code == 201
        assert (await client.post("/payments/1", headers=h, json={"amount": 5})).status_code == 201
        assert (await client.post("/payments/1", headers=h, json={"amount": 6})).status_code == 422
        slow = {**h, "idempotency-key": KEY + "-slow"}
        first = asyncio.create_task(client.post("/payments/2", headers=slow, json={"slow": 1}))
        await entered.wait()
        assert (await client.post("/payments/2", headers=slow, json={"slow": 1})).status_code == 409
        store.down = True
        assert (await client.post("/payments/3", headers=h, json={"amount": 5})).status_code == 503
        store.down = False
        gate.set()
        assert (await first).status_code == 201
    check_everything(events, registry, captured, route="/payments/{id}", surface="asgi")
    assert app.hook_failures == 6


def test_wsgi_reports_each_decision_once(captured: io.StringIO) -> None:
    """WSGI: the same scenario; the route label is the configured Route's pattern."""
    gate = threading.Event()

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        if b"slow" in body:
            gate.wait(10)
        start_response("201 Created", [("content-type", "application/json")])
        return [b'{"ok":true}']

    events: list[Decision] = []
    registry = CollectorRegistry()
    store = DownStore()
    app = wsgi.IdempotencyMiddleware(
        wsgi_app,
        store=store,
        tenant=tenant_from_header("X-Api-Key"),
        routes=[Route("/payments/{id}")],
        on_decision=[events.append, Metrics(registry=registry, store=store), failing],
    )
    h = {"idempotency-key": KEY, "x-api-key": TENANT, "authorization": AUTH}
    with httpx.Client(transport=httpx.WSGITransport(app), base_url="http://t") as client:
        assert client.post("/payments/1", headers=h, json={"amount": 5}).status_code == 201
        assert client.post("/payments/1", headers=h, json={"amount": 5}).status_code == 201
        assert client.post("/payments/1", headers=h, json={"amount": 6}).status_code == 422
        slow = {**h, "idempotency-key": KEY + "-slow"}
        results: list[int] = []
        thread = threading.Thread(
            target=lambda: results.append(
                client.post("/payments/2", headers=slow, json={"slow": 1}).status_code
            )
        )
        thread.start()
        while store.stats().in_flight == 0:
            threading.Event().wait(0.001)
        assert registry.get_sample_value("oncely_in_flight_keys", {"store": "memory"}) == 1.0
        assert client.post("/payments/2", headers=slow, json={"slow": 1}).status_code == 409
        store.down = True
        assert client.post("/payments/3", headers=h, json={"amount": 5}).status_code == 503
        store.down = False
        gate.set()
        thread.join()
    assert results == [201]
    assert registry.get_sample_value("oncely_in_flight_keys", {"store": "memory"}) == 0.0
    check_everything(events, registry, captured, route="/payments/{id}", surface="wsgi")
    assert app.hook_failures == 6


def test_decorator_reports_each_decision_once(captured: io.StringIO) -> None:
    """@idempotent: the route is the prefix; in flight is a concurrent call with the key."""
    gate = threading.Event()
    events: list[Decision] = []
    registry = CollectorRegistry()
    store = DownStore()

    @idempotent(
        prefix="payments.charge",
        key=lambda order: order["key"],
        payload=lambda order: order,
        tenant=lambda order: TENANT,
        store=store,
        on_decision=[events.append, Metrics(registry=registry), failing],
    )
    def charge(order: dict[str, Any]) -> dict[str, Any]:
        if order.get("slow"):
            gate.wait(10)
        return {"charged": True}

    from oncely import KeyInFlight, KeyReused

    assert charge({"key": KEY, "amount": 5}) == {"charged": True}
    assert charge({"key": KEY, "amount": 5}) == {"charged": True}
    with pytest.raises(KeyReused):
        charge({"key": KEY, "amount": 6})
    thread = threading.Thread(target=charge, args=({"key": KEY + "s", "slow": 1},))
    thread.start()
    while store.stats().in_flight == 0:
        threading.Event().wait(0.001)
    with pytest.raises(KeyInFlight):
        charge({"key": KEY + "s", "slow": 1})
    store.down = True
    with pytest.raises(StoreUnavailable):
        charge({"key": KEY + "x", "amount": 5})
    store.down = False
    gate.set()
    thread.join()
    assert {e.status for e in events} == {None}
    check_everything(events, registry, captured, route="payments.charge", surface="function")
    assert charge.observer.hook_failures == 6  # type: ignore[attr-defined]


def test_no_hook_and_logging_off_means_no_watch() -> None:
    """Nobody listens: no decision is built (the request pays one check)."""
    logging.getLogger("oncely.decisions").setLevel(logging.WARNING)
    try:
        app = wsgi.IdempotencyMiddleware(
            lambda e, s: [], store="memory:", tenant=tenant_from_header("X")
        )
        assert app.observer.start("POST", {}, None) is None
    finally:
        logging.getLogger("oncely.decisions").setLevel(logging.NOTSET)


async def test_spans_for_claim_complete_and_replay_under_the_request_span() -> None:
    """Child spans of the request's span; a mismatch is an attribute, a store outage the only
    error status."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from oncely.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    async def pay(request: StarletteRequest) -> JSONResponse:
        return JSONResponse({"ok": True}, status_code=201)

    store = AsyncDownStore()
    app = asgi.IdempotencyMiddleware(
        Starlette(routes=[StarletteRoute("/payments/{id}", pay, methods=["POST"])]),
        store=store,
        tenant=tenant_from_header("X-Api-Key"),
        on_decision=Tracing(provider),
    )
    h = {"idempotency-key": KEY, "x-api-key": TENANT}
    names: list[list[str]] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for body, down in (({"a": 1}, False), ({"a": 1}, False), ({"a": 2}, False), ({}, True)):
            store.down = down
            exporter.clear()
            with tracer.start_as_current_span("request") as request_span:
                await c.post("/payments/1", headers=h, json=body)
            spans = exporter.get_finished_spans()
            parent = request_span.get_span_context().span_id
            children = [s for s in spans if s.name.startswith("oncely.")]
            assert {s.parent.span_id for s in children if s.parent} == {parent}
            assert len([s for s in children if s.parent]) == len(children)
            names.append([s.name for s in children])
            errors = [s.name for s in spans if s.status.status_code is StatusCode.ERROR]
            assert errors == (["oncely.claim"] if down else [])
            request = next(s for s in spans if s.name == "request")
            assert request.attributes is not None
            outcome = request.attributes["oncely.outcome"]
            if body == {"a": 2}:
                claim = next(s for s in children if s.name == "oncely.claim")
                assert claim.attributes is not None
                assert claim.attributes["oncely.conflict"] == "payload_mismatch"
                assert claim.attributes["oncely.route"] == "/payments/{id}"
            assert outcome in ("executed", "replayed", "payload_mismatch", "store_unavailable")
    assert names == [
        ["oncely.claim", "oncely.complete"],
        ["oncely.claim", "oncely.replay"],
        ["oncely.claim"],
        ["oncely.claim"],
    ]


@pytest.mark.parametrize("wrapped", ["wsgi_app", "app"])
def test_wsgi_under_flask_labels_decisions_with_the_flask_rule(wrapped: str) -> None:
    """Flask routes after the middleware: the label is the werkzeug rule the app will route
    to (never the raw path with its id), whether the middleware wraps ``app.wsgi_app`` in place
    or the Flask app itself; a path Flask does not route falls back to oncely's own pattern."""
    import flask

    flask_app = flask.Flask("labels")

    @flask_app.post("/orders/<int:order_id>/pay")
    def pay(order_id: int) -> flask.Response:
        return flask.Response(b'{"ok":true}', 201, content_type="application/json")

    events: list[Decision] = []
    options: dict[str, Any] = {
        "store": MemoryStore(),
        "tenant": tenant_from_header("X-Api-Key"),
        "on_decision": events.append,
    }
    served: Any
    if wrapped == "wsgi_app":
        flask_app.wsgi_app = wsgi.IdempotencyMiddleware(  # type: ignore[method-assign]
            flask_app.wsgi_app, **options
        )
        served = flask_app
    else:
        served = wsgi.IdempotencyMiddleware(flask_app, **options)
    h = {"idempotency-key": KEY, "x-api-key": TENANT}
    with httpx.Client(transport=httpx.WSGITransport(served), base_url="http://t") as client:
        assert client.post("/orders/41/pay", headers=h, json={"a": 1}).status_code == 201
        assert client.post("/orders/41/pay", headers=h, json={"a": 1}).status_code == 201
        other = {**h, "idempotency-key": KEY + "-2"}
        assert client.post("/orders/42/pay", headers=other, json={"a": 1}).status_code == 201
        lost = {**h, "idempotency-key": KEY + "-3"}
        assert client.post("/nowhere/7", headers=lost, json={"a": 1}).status_code == 404
    assert [(e.outcome, e.route) for e in events] == [
        ("executed", "/orders/<int:order_id>/pay"),
        ("replayed", "/orders/<int:order_id>/pay"),
        ("executed", "/orders/<int:order_id>/pay"),
        ("executed", "unmatched"),
    ]


# The other outcomes, in order: no key, a bad key, no tenant, a body over the limit, the
# handler's error (the key freed), an answer too large to keep and its repeat, and a handler
# whose key is taken over while it runs (a pause past its lease), then the one that took it.
REFUSALS = [
    ("missing_key", 400),
    ("malformed_key", 400),
    ("missing_tenant", 400),
    ("too_large", 413),
    ("released_error", 500),
    ("executed", 201),
    ("not_replayable", 410),
    ("executed", 201),
    ("lease_lost", 201),
]
#: What the clients saw: the same, but the stale holder's response was aborted.
SEEN = sorted([status for _, status in REFUSALS[:-1]] + [0])


async def test_asgi_reports_refusals_errors_large_answers_and_a_lost_lease(
    captured: io.StringIO,
) -> None:
    now = [1_000_000.0]
    store = AsyncMemoryStore(clock=lambda: now[0])
    paused, resume = asyncio.Event(), asyncio.Event()

    async def pay(request: StarletteRequest) -> JSONResponse:
        body = await request.json()
        if body.get("fail"):
            return JSONResponse({"error": "card declined"}, status_code=500)
        if body.get("pause"):
            paused.set()
            await resume.wait()  # meanwhile the store's clock passes the lease: taken over
        return JSONResponse({"ok": True, "pad": "x" * body.get("pad", 0)}, status_code=201)

    events: list[Decision] = []
    registry = CollectorRegistry()
    app = asgi.IdempotencyMiddleware(
        Starlette(routes=[StarletteRoute("/payments/{id}", pay, methods=["POST"])]),
        store=store,
        tenant=tenant_from_header("X-Api-Key"),
        on_decision=[events.append, Metrics(registry=registry)],
        max_request_body=1000,
        max_response_body=2000,
        lease=5.0,
    )
    h = {"x-api-key": TENANT, "authorization": AUTH}
    statuses: list[int] = []
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def post(path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
            try:
                statuses.append((await client.post(path, headers=headers, json=body)).status_code)
            except LeaseLost:  # the stale holder's answer is aborted, never sent as if kept
                statuses.append(0)

        await post("/payments/1", h, {"amount": 5})
        await post("/payments/1", {**h, "idempotency-key": "bad key\t!"}, {"amount": 5})
        await post("/payments/1", {"idempotency-key": KEY, "authorization": AUTH}, {"a": 1})
        await post("/payments/1", {**h, "idempotency-key": KEY}, {"pad": "y" * 2000})
        await post("/payments/1", {**h, "idempotency-key": KEY + "-f"}, {"fail": 1})
        big = {**h, "idempotency-key": KEY + "-big"}
        await post("/payments/2", big, {"pad": 5000})
        await post("/payments/2", big, {"pad": 5000})
        late = {**h, "idempotency-key": KEY + "-late"}
        first = asyncio.create_task(post("/payments/3", late, {"pause": 1}))
        await paused.wait()
        now[0] += 60.0  # the first holder is paused past its lease
        paused.clear()
        second = asyncio.create_task(post("/payments/3", late, {"pause": 1}))
        await paused.wait()
        resume.set()
        await first
        await second
    outcomes = [(e.outcome, e.status) for e in events]
    # The two holders of the late key end in either order: compare as a multiset there.
    assert outcomes[:7] == REFUSALS[:7]
    assert sorted(outcomes[7:]) == sorted(REFUSALS[7:])
    assert sorted(statuses) == SEEN
    assert {e.route for e in events} == {"/payments/{id}"}
    assert {e.surface for e in events} == {"asgi"}
    by = {e.outcome: e for e in events}
    assert by["not_replayable"].response_size is None
    assert by["lease_lost"].attempt == 1  # the first holder; the one that took over is 2
    assert max(e.attempt or 0 for e in events if e.outcome == "executed") == 2
    assert by["released_error"].key_hash is not None
    assert by["missing_key"].key_hash is None
    for outcome in {name for name, _ in REFUSALS}:
        value = registry.get_sample_value(
            "oncely_decisions_total",
            {"outcome": outcome, "route": "/payments/{id}", "surface": "asgi"},
        )
        assert value == sum(1 for name, _ in REFUSALS if name == outcome), outcome
    lines = decision_lines(captured)
    assert [line["outcome"] for line in lines] == [e.outcome for e in events]
    levels = {line["outcome"]: line["level"] for line in lines}
    assert levels["lease_lost"] == "warning"
    assert levels["missing_key"] == "info"
    text = captured.getvalue()
    for secret in (KEY, TENANT, AUTH, "token-very-secret", "card declined", "yyyy"):
        assert secret not in text, secret


class StatsDownStore(MemoryStore):
    """A store whose ``stats()`` fails (the store is out when the metrics are scraped)."""

    def stats(self, *, limit: int = 20) -> StoreStats:
        raise StoreUnavailable("connection refused")


class AsyncStatsDownStore(AsyncMemoryStore):
    async def stats(self, *, limit: int = 20) -> StoreStats:
        raise StoreUnavailable("connection refused")


async def test_a_scrape_with_the_store_out_still_renders_the_other_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import generate_latest

    for store in (StatsDownStore(), AsyncStatsDownStore()):
        registry = CollectorRegistry()
        metrics = Metrics(registry=registry, store=store)
        metrics.count("store_unavailable", "/p", "asgi", "memory", None, [("claim", 0.001)])
        await metrics.refresh()
        text = generate_latest(registry).decode()
        assert 'oncely_decisions_total{outcome="store_unavailable",route="/p"' in text
        assert registry.get_sample_value("oncely_in_flight_keys", {"store": "memory"}) is None
    assert "oncely_in_flight_keys left out of this scrape" in caplog.text
