"""Decision lines reach structlog through its stdlib bridge: ``ProcessorFormatter`` with
``ExtraAdder`` turns every decision field into an event key, and the raw key, tenant and body
never appear."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from oncely import asgi, tenant_from_header

KEY = "raw-key-structlog-51d0"
TENANT = "tenant-secret-structlog-77"
BODY = b'{"amount": 4200, "card": "4242424242424242"}'


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                structlog.processors.TimeStamper(fmt="iso"),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logger = logging.getLogger("oncely.decisions")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


async def pay(request: Request) -> Response:
    await request.body()
    return Response(b'{"id":"pay_1"}', status_code=201, media_type="application/json")


app = Starlette(routes=[Route("/accounts/{account}/payments", pay, methods=["POST"])])


async def test_decision_fields_arrive_as_structlog_event_keys(lines: io.StringIO) -> None:
    wrapped = asgi.IdempotencyMiddleware(
        app, store="memory:", tenant=tenant_from_header("X-Tenant")
    )
    transport = httpx.ASGITransport(app=wrapped)
    headers = {"Idempotency-Key": KEY, "X-Tenant": TENANT, "Content-Type": "application/json"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = await client.post("/accounts/acct-9/payments", content=BODY, headers=headers)
        again = await client.post("/accounts/acct-9/payments", content=BODY, headers=headers)
        other = await client.post(
            "/accounts/acct-9/payments", content=b'{"amount": 1}', headers=headers
        )
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 422)
    text = lines.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    assert [event["outcome"] for event in events] == ["executed", "replayed", "payload_mismatch"]
    for event in events:
        assert event["logger"] == "oncely.decisions"
        assert event["level"] == "info"
        assert event["route"] == "/accounts/{account}/payments"  # the template, not the path
        assert event["surface"] == "asgi"
        assert event["store"] == "memory"
        assert event["method"] == "POST"
        assert len(event["key_hash"]) == 16
        assert len(event["tenant_hash"]) == 16
        assert event["duration"] > 0
        assert event["event"].startswith("oncely asgi POST /accounts/{account}/payments")
        assert "timestamp" in event
    assert [event["status"] for event in events] == [201, 201, 422]
    assert events[0]["attempt"] == 1
    assert events[0]["response_size"] == len(b'{"id":"pay_1"}')
    assert len({event["key_hash"] for event in events}) == 1
    for secret in (KEY, TENANT, "4242424242424242", "amount", "acct-9"):
        assert secret not in text
