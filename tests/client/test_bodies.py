"""Streamed request bodies: buffered up to max_body and sent again on a retry; beyond it one
attempt, and a clear error instead of httpx's StreamConsumed."""

from __future__ import annotations

import json

import pytest

from oncely.client import BodyNotReplayable

from .conftest import MakeClient
from .support import LOSE, Service, answer, new_customer, payment

pytestmark = pytest.mark.slow

HEADERS = {"Content-Type": "application/json"}


def chunks_of(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def test_a_streamed_body_within_the_limit_is_sent_again_whole(
    service: Service, make_client: MakeClient
) -> None:
    customer = new_customer()
    body = json.dumps(payment(customer)).encode()
    client = make_client(service.url, [LOSE])
    response = await client.request(
        "POST",
        "/payments",
        content=client.stream_body(chunks_of(body)),
        headers=HEADERS,
    )
    assert response.status_code == 201
    assert response.extensions["oncely"]["replayed"] is True
    assert client.faults.bodies == [body, body]
    assert client.faults.seen[1].headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in client.faults.seen[1].headers
    assert len(service.payments(customer)) == 1


async def test_a_streamed_body_over_the_limit_is_sent_once_and_fails_clearly(
    service: Service, make_client: MakeClient
) -> None:
    """The answer is lost after the stream was sent: BodyNotReplayable, one attempt."""
    customer = new_customer()
    body = json.dumps(payment(customer)).encode()
    client = make_client(service.url, [LOSE], max_body=16)
    with pytest.raises(BodyNotReplayable, match="max_body") as caught:
        await client.request(
            "POST",
            "/payments",
            content=client.stream_body(chunks_of(body)),
            headers=HEADERS,
        )
    assert caught.value.attempts == 1
    assert caught.value.key == client.faults.keys()[0]
    assert client.faults.bodies == [body]
    assert len(service.payments(customer)) == 1  # it did reach the server, once


async def test_a_503_to_a_stream_over_the_limit_is_returned_not_retried(
    service: Service, make_client: MakeClient
) -> None:
    body = json.dumps(payment(new_customer())).encode()
    client = make_client(service.url, [answer(503)], max_body=16)
    response = await client.request(
        "POST", "/payments", content=client.stream_body(chunks_of(body)), headers=HEADERS
    )
    assert response.status_code == 503
    report = response.extensions["oncely"]
    assert report["stopped"] == "not_retryable"
    assert "max_body" in report["history"][0]["reason"]
    assert client.faults.attempts == 1
