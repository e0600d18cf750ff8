"""Metrics alone on a surface count straight from the request (no Decision is built), and what
they count is exactly what the same Metrics count from decisions beside another hook; the
numbers render as prometheus-client's own metrics would, and stay exact under threads."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from oncely import (
    KeyReused,
    Route,
    StoreUnavailable,
    asgi,
    idempotent,
    tenant_from_header,
    wsgi,
)
from oncely import metrics as metrics_module
from oncely.events import OUTCOMES, CountingHook, Decision
from oncely.metrics import OPERATION_BUCKETS, SIZE_BUCKETS, Metrics

from .test_observe import AsyncDownStore, DownStore

TENANT = "tenant-counting"
#: What each surface's scenario comes to, in order.
ASGI_SCENARIO = [
    "executed",
    "replayed",
    "payload_mismatch",
    "missing_key",
    "too_large",
    "released_error",
    "store_unavailable",
    "executed",
]
FUNCTION_SCENARIO = ["executed", "replayed", "payload_mismatch", "store_unavailable", "executed"]


@pytest.fixture(autouse=True)
def decision_log_off() -> Iterator[None]:
    """The ``oncely.decisions`` log not enabled for INFO, as in a service that logs warnings."""
    logger = logging.getLogger("oncely.decisions")
    old = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(old)


def counted(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample that does not depend on how long a store took: the decisions, how many
    operations of each kind were timed, and the whole histogram of the sizes kept."""
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            timing = family.name == "oncely_store_operation_duration_seconds"
            if sample.name.endswith("_created") or (timing and not sample.name.endswith("_count")):
                continue
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def asgi_scenario(on_decision: Callable[[CollectorRegistry], list[Any]]) -> tuple[Any, Any]:
    """The ASGI scenario against a fresh store; (the middleware, the registry)."""
    registry = CollectorRegistry()
    store = AsyncDownStore()

    async def pay(request: StarletteRequest) -> Response:
        body = await request.json()
        if body.get("fail"):
            return JSONResponse({"error": "declined"}, status_code=500)
        return JSONResponse({"id": request.path_params["id"], "ok": True}, status_code=201)

    app = asgi.IdempotencyMiddleware(
        Starlette(routes=[StarletteRoute("/payments/{id}", pay, methods=["POST"])]),
        store=store,
        tenant=tenant_from_header("X-Api-Key"),
        max_request_body=64,
        on_decision=on_decision(registry),
    )

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def post(key: str | None, body: Any, path: str = "/payments/1") -> int:
                headers = {"x-api-key": TENANT}
                if key is not None:
                    headers["idempotency-key"] = key
                return (await client.post(path, headers=headers, json=body)).status_code

            statuses = [
                await post("k1", {"amount": 5}),
                await post("k1", {"amount": 5}),
                await post("k1", {"amount": 6}),
                await post(None, {"amount": 5}),
                await post("k2", {"pad": "x" * 100}),
                await post("k3", {"fail": True}),
            ]
            store.down = True
            statuses.append(await post("k4", {"amount": 5}))
            store.down = False
            statuses.append(await post("k5", {"amount": 7}, "/payments/2"))
            return statuses

    assert asyncio.run(run()) == [201, 201, 422, 400, 413, 500, 503, 201]
    return app, registry


def wsgi_scenario(on_decision: Callable[[CollectorRegistry], list[Any]]) -> tuple[Any, Any]:
    registry = CollectorRegistry()
    store = DownStore()

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        if b"fail" in body:
            start_response("500 Internal Server Error", [("content-type", "application/json")])
            return [b'{"error":"declined"}']
        start_response("201 Created", [("content-type", "application/json")])
        return [b'{"ok":true}']

    app = wsgi.IdempotencyMiddleware(
        wsgi_app,
        store=store,
        tenant=tenant_from_header("X-Api-Key"),
        routes=[Route("/payments/{id}")],
        max_request_body=64,
        on_decision=on_decision(registry),
    )
    statuses = []
    with httpx.Client(transport=httpx.WSGITransport(app), base_url="http://t") as client:

        def post(key: str | None, body: Any, path: str = "/payments/1") -> int:
            headers = {"x-api-key": TENANT}
            if key is not None:
                headers["idempotency-key"] = key
            return client.post(path, headers=headers, json=body).status_code

        statuses = [
            post("k1", {"amount": 5}),
            post("k1", {"amount": 5}),
            post("k1", {"amount": 6}),
            post(None, {"amount": 5}),
            post("k2", {"pad": "x" * 100}),
            post("k3", {"fail": True}),
        ]
        store.down = True
        statuses.append(post("k4", {"amount": 5}))
        store.down = False
        statuses.append(post("k5", {"amount": 7}, "/payments/2"))
    assert statuses == [201, 201, 422, 400, 413, 500, 503, 201]
    return app, registry


def function_scenario(on_decision: Callable[[CollectorRegistry], list[Any]]) -> tuple[Any, Any]:
    registry = CollectorRegistry()
    store = DownStore()

    @idempotent(
        prefix="payments.charge",
        key=lambda order: order["key"],
        payload=lambda order: order,
        tenant=lambda order: TENANT,
        store=store,
        on_decision=on_decision(registry),
    )
    def charge(order: dict[str, Any]) -> dict[str, Any]:
        return {"charged": order["amount"]}

    assert charge({"key": "k1", "amount": 5}) == {"charged": 5}
    assert charge({"key": "k1", "amount": 5}) == {"charged": 5}
    with pytest.raises(KeyReused):
        charge({"key": "k1", "amount": 6})
    store.down = True
    with pytest.raises(StoreUnavailable):
        charge({"key": "k2", "amount": 5})
    store.down = False
    assert charge({"key": "k3", "amount": 7}) == {"charged": 7}
    return charge, registry


SCENARIOS = {
    "asgi": (asgi_scenario, ASGI_SCENARIO, "/payments/{id}"),
    "wsgi": (wsgi_scenario, ASGI_SCENARIO, "/payments/{id}"),
    "function": (function_scenario, FUNCTION_SCENARIO, "payments.charge"),
}


@pytest.mark.parametrize("surface", list(SCENARIOS))
def test_metrics_alone_count_what_they_count_beside_another_hook(surface: str) -> None:
    scenario, outcomes, route = SCENARIOS[surface]
    alone, alone_registry = scenario(lambda registry: [Metrics(registry=registry)])
    events: list[Decision] = []
    beside, beside_registry = scenario(lambda registry: [Metrics(registry=registry), events.append])
    # Alone, the request was counted straight from its watch; beside a hook, from decisions.
    assert isinstance(alone.observer.counting, Metrics)
    assert beside.observer.counting is None
    assert [event.outcome for event in events] == outcomes
    assert counted(alone_registry) == counted(beside_registry)
    # And what both counted is what happened.
    for outcome in OUTCOMES:
        value = alone_registry.get_sample_value(
            "oncely_decisions_total", {"outcome": outcome, "route": route, "surface": surface}
        )
        assert (value or 0) == outcomes.count(outcome), outcome
    claims = alone_registry.get_sample_value(
        "oncely_store_operation_duration_seconds_count", {"store": "memory", "operation": "claim"}
    )
    assert claims == sum(1 for o in outcomes if o not in ("missing_key", "too_large"))
    kept = alone_registry.get_sample_value(
        "oncely_stored_response_size_bytes_count", {"surface": surface}
    )
    assert kept == outcomes.count("executed")
    sums = [
        registry.get_sample_value(
            "oncely_store_operation_duration_seconds_sum",
            {"store": "memory", "operation": "claim"},
        )
        for registry in (alone_registry, beside_registry)
    ]
    assert all(total is not None and total > 0 for total in sums)


def test_plain_numbers_render_as_prometheus_clients_own_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same counts (values on, between and past the buckets' bounds) give the same text as
    prometheus-client's Counter and Histogram, which multiprocess mode uses, less the
    ``_created`` timestamps."""
    plain_registry, shared_registry = CollectorRegistry(), CollectorRegistry()
    plain = Metrics(registry=plain_registry)
    monkeypatch.setattr(metrics_module, "_multiprocess", lambda: True)
    shared = Metrics(registry=shared_registry)
    assert plain._shared is None
    assert shared._shared is not None
    timings = [0.0, *OPERATION_BUCKETS, 0.00003, 0.0003, 0.7, 1.5, 60.0]
    sizes = [0, 1, *(int(b) for b in SIZE_BUCKETS), 65, 5_000_000]
    for hook in (plain, shared):
        for i, seconds in enumerate(timings):
            size = sizes[i % len(sizes)]
            ops = [("claim", seconds), ("complete", seconds / 2)]
            hook.count("executed", "/p/{id}", "asgi", "redis", size, ops)
            hook.count("replayed", "/p/{id}", "asgi", "redis", None, ops[:1])
        for size in sizes:
            hook.count("executed", "/q", "wsgi", "redis", size, [])
        hook.count("in_flight", "/p/{id}", "function", "redis", None, [("claim", 0.002)])
        stray: Any = "not an outcome"  # a label outside OUTCOMES: nothing is counted
        hook.count(stray, "/p/{id}", "asgi", "redis", None, [("claim", 1.0)])

    def text(registry: CollectorRegistry) -> list[str]:
        rendered = generate_latest(registry).decode().splitlines()
        return sorted(line for line in rendered if not re.match(r"\S+_created[{ ]", line))

    assert text(plain_registry) == text(shared_registry)
    assert "oncely_decisions_total" in "\n".join(text(plain_registry))
    created = generate_latest(plain_registry).decode()
    assert "oncely_decisions_created{" in created
    assert "oncely_store_operation_duration_seconds_created{" in created


def test_the_counts_stay_exact_under_threads() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    threads, each = 8, 5_000
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(each):
            metrics.count("replayed", "/p", "wsgi", "sqlite", None, [("claim", 0.001)])

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    total = threads * each
    labels = {"outcome": "replayed", "route": "/p", "surface": "wsgi"}
    assert registry.get_sample_value("oncely_decisions_total", labels) == total
    timed = {"store": "sqlite", "operation": "claim"}
    name = "oncely_store_operation_duration_seconds"
    assert registry.get_sample_value(f"{name}_count", timed) == total
    assert registry.get_sample_value(f"{name}_bucket", {**timed, "le": "0.001"}) == total
    assert registry.get_sample_value(f"{name}_bucket", {**timed, "le": "0.0005"}) == 0
    assert registry.get_sample_value(f"{name}_sum", timed) == pytest.approx(total * 0.001)


class Broken(CountingHook):
    def count(self, *args: Any) -> None:
        raise RuntimeError("this counter is broken")


def test_a_failing_counting_hook_is_counted_and_logged_never_raised() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger("oncely").addHandler(handler)
    try:
        app, _ = asgi_scenario(lambda registry: [Broken()])
    finally:
        logging.getLogger("oncely").removeHandler(handler)
    assert isinstance(app.observer.counting, Broken)
    assert app.hook_failures == len(ASGI_SCENARIO)
    assert "the on_decision hook Broken failed: RuntimeError: this counter is broken" in (
        out.getvalue()
    )


def test_the_decision_log_on_turns_the_straight_count_off() -> None:
    """With the log enabled, a decision is built for the log line; Metrics count it the same."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("oncely.decisions")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        app, registry = wsgi_scenario(lambda registry: [Metrics(registry=registry)])
        watch = app.observer.start("POST", {}, "/x")
        assert watch is not None
        assert type(watch).__name__ == "Watch"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.WARNING)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(ASGI_SCENARIO)
    assert [line.split(" -> ")[1].split()[0] for line in lines] == ASGI_SCENARIO
    _, quiet = wsgi_scenario(lambda registry: [Metrics(registry=registry)])  # the log off again
    assert counted(registry) == counted(quiet)
