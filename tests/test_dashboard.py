"""The dashboard as any user mounts it: its page, its snapshot (the polling fallback) and its
server-sent events carry the real numbers of a scripted burst, with hashed keys only."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Mount
from starlette.routing import Route as StarletteRoute

from oncely import asgi, tenant_from_header
from oncely.dashboard import Dashboard
from oncely.stores.memory import AsyncMemoryStore

KEY = "raw-dashboard-key-51d0"
TENANT = "sk_live_dashboard_tenant"


def _app() -> tuple[Any, Dashboard, asyncio.Event, asyncio.Event]:
    gate, entered = asyncio.Event(), asyncio.Event()

    async def pay(request: StarletteRequest) -> JSONResponse:
        if (await request.json()).get("slow"):
            entered.set()
            await gate.wait()
        return JSONResponse({"ok": True}, status_code=201)

    def failing_panel() -> dict[str, Any]:
        raise RuntimeError("ledger offline")

    store = AsyncMemoryStore()
    dashboard = Dashboard(
        store=store,
        panels={"audit": lambda: {"intended": 4, "duplicates": 0}, "broken": failing_panel},
    )
    inner = Starlette(
        routes=[
            StarletteRoute("/payments/{id}", pay, methods=["POST"]),
            Mount("/ops/dashboard", app=dashboard),
        ]
    )
    app = asgi.IdempotencyMiddleware(
        inner, store=store, tenant=tenant_from_header("X-Api-Key"), on_decision=dashboard.record
    )
    return app, dashboard, gate, entered


async def _burst(client: httpx.AsyncClient, entered: asyncio.Event) -> asyncio.Task[httpx.Response]:
    """3 new keys, 2 replays, 1 mismatch, 1 conflict while a slow first request holds its key
    (the slow one, returned, ends when the gate opens)."""
    h = {"x-api-key": TENANT}
    for n in range(3):
        r = await client.post(
            "/payments/1", headers={**h, "idempotency-key": f"{KEY}-{n}"}, json={}
        )
        assert r.status_code == 201
    for _ in range(2):
        r = await client.post("/payments/1", headers={**h, "idempotency-key": f"{KEY}-0"}, json={})
        assert r.status_code == 201
    r = await client.post("/payments/1", headers={**h, "idempotency-key": f"{KEY}-0"}, json=[1])
    assert r.status_code == 422
    slow = {**h, "idempotency-key": f"{KEY}-slow"}
    first = asyncio.create_task(client.post("/payments/2", headers=slow, json={"slow": 1}))
    await entered.wait()
    assert (await client.post("/payments/2", headers=slow, json={"slow": 1})).status_code == 409
    return first


async def test_a_mounted_dashboard_serves_its_page_and_the_numbers_of_a_burst() -> None:
    app, _, gate, entered = _app()
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        slow = await _burst(client, entered)
        page = await client.get("/ops/dashboard/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        # Served by itself: nothing fetched from elsewhere (no CDN), links under the mount.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "a remote asset"
        assert "__BASE__" not in page.text
        assert '"/ops/dashboard"' in page.text
        snap = (await client.get("/ops/dashboard/snapshot.json")).json()
        missing = await client.get("/ops/dashboard/nothing-here")
        gate.set()
        assert (await slow).status_code == 201
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    totals = snap["totals"]
    assert (totals["executed"], totals["replayed"]) == (3, 2)
    assert (totals["payload_mismatch"], totals["in_flight"]) == (1, 1)
    assert snap["total"] == 7
    assert snap["replay_ratio"] == 2 / 5
    assert sum(point.get("executed", 0) for point in snap["series"]) == 3
    assert snap["latency_ms"]["samples"] >= 7
    assert snap["latency_ms"]["p50"] > 0
    assert snap["latency_ms"]["p99"] >= snap["latency_ms"]["p50"]
    assert [r["outcome"] for r in snap["recent"]] == ["in_flight", "payload_mismatch"]
    assert snap["store"]["in_flight"] == 1  # the slow one, still held when the page was read
    (held,) = snap["store"]["keys"]
    assert 0 <= held["age"] < 30  # claimed during this test
    assert held["lease_left"] > 0
    assert snap["panels"]["audit"] == {"intended": 4, "duplicates": 0}
    assert snap["panels"]["broken"] == {"error": "RuntimeError: ledger offline"}
    assert KEY not in json.dumps(snap)
    assert TENANT not in json.dumps(snap)


async def test_the_event_stream_sends_snapshots_until_the_viewer_leaves() -> None:
    app, dashboard, gate, entered = _app()
    dashboard.interval = 0.05
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        slow = await _burst(client, entered)
        gate.set()
        assert (await slow).status_code == 201
    # The stream never ends by itself: drive the ASGI app by hand and leave after 3 events.
    sent: list[dict[str, Any]] = []
    leave = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        events = b"".join(m.get("body", b"") for m in sent[1:]).count(b"data: ")
        if events >= 3:
            leave.set()

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/ops/dashboard/events",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    async with asyncio.timeout(10):
        await app(scope, receive, send)
    start = sent[0]
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream") in start["headers"]
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert body.startswith("retry: 2000\n\n")
    snapshots = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(snapshots) >= 3
    assert all(s["totals"]["executed"] == 4 for s in snapshots)  # the slow one finished
    assert all(s["totals"]["replayed"] == 2 for s in snapshots)
    assert sent[-1] == {"type": "http.response.body", "body": b""}  # ended, not cut
