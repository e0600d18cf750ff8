"""What the caller is told: the report, the on_retry hook, one log line per retry (key
hashed, no body, no credentials), and timeouts clipped to the deadline."""

from __future__ import annotations

import logging

import httpx
import pytest

from oncely.client import RetryEvent, RetryPolicy

from .conftest import MakeClient
from .support import LOSE, REFUSE, Service, answer, new_customer, payment

pytestmark = pytest.mark.slow


async def test_on_retry_sees_each_retry_before_its_sleep(
    service: Service, make_client: MakeClient
) -> None:
    """One event per retry: the attempt that failed, its status or error, the sleep."""
    events: list[RetryEvent] = []
    client = make_client(
        service.url, [REFUSE, answer(503, retry_after="2")], on_retry=events.append, random=0.5
    )
    response = await client.request("POST", "/payments", json=payment(new_customer()))
    assert response.status_code == 201
    key = response.extensions["oncely"]["key"]
    assert [(e.attempt, e.status, type(e.error).__name__, e.sleep) for e in events] == [
        (1, None, "ConnectError", 0.125),
        (2, 503, "NoneType", 2.0),
    ]
    assert {e.key for e in events} == {key}
    assert events[0].method == "POST"
    assert events[0].url.path == "/payments"
    assert client.time.sleeps == [0.125, 2.0]


async def test_one_log_line_per_retry_with_the_key_hashed(
    service: Service, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The log never shows the key, the body, the query or the Authorization header."""
    customer = new_customer()
    client = make_client(
        service.url, [LOSE, answer(502)], headers={"Authorization": "Bearer sk_live_secret"}
    )
    with caplog.at_level(logging.INFO, logger="oncely.client"):
        response = await client.request(
            "POST", f"/payments?token=sekrit-{customer}", json=payment(customer)
        )
    key = response.extensions["oncely"]["key"]
    lines = [r.getMessage() for r in caplog.records if r.name == "oncely.client"]
    assert len(lines) == 2
    text = "\n".join(lines)
    assert key not in text
    assert "sha256:" in text
    for secret in ("sk_live_secret", "sekrit", customer, "amount"):
        assert secret not in text


async def test_each_attempt_gets_at_most_the_time_left(
    service: Service, make_client: MakeClient
) -> None:
    """deadline 5 s, client timeout 30 s: the first attempt may take 5 s; after a 2 s sleep
    the next one 3 s."""
    timeouts = []
    client = make_client(
        service.url, [answer(503, retry_after="2")], policy=RetryPolicy(deadline=5)
    )
    client.faults.hook = lambda request: timeouts.append(request.extensions["timeout"])
    response = await client.request(
        "POST", "/payments", json=payment(new_customer()), timeout=httpx.Timeout(30, pool=1)
    )
    assert response.status_code == 201
    assert timeouts == [
        {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 1.0},
        {"connect": 3.0, "read": 3.0, "write": 3.0, "pool": 1.0},
    ]


async def test_a_request_policy_overrides_the_transports(
    service: Service, make_client: MakeClient
) -> None:
    """extensions={"oncely": {"policy": ...}}: five attempts for this request, not three."""
    client = make_client(service.url, [answer(503)] * 4)
    response = await client.request(
        "POST",
        "/payments",
        json=payment(new_customer()),
        extensions={"oncely": {"policy": RetryPolicy(attempts=5)}},
    )
    assert response.status_code == 201
    assert response.extensions["oncely"]["attempts"] == 5
    assert client.faults.attempts == 5
