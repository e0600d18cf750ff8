"""What is retried, with which key, after how long: one table, through both transports.

Every case runs against the real payments service, with the faults of its script injected
between the transport and the wire, a clock that moves only when the client sleeps, and the
jitter's random number fixed, so each sleep is known exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from oncely.client import RetryLater, RetryPolicy

from .conftest import MakeClient
from .support import (
    LOSE,
    REFUSE,
    TIMEOUT,
    Action,
    Answer,
    Service,
    answer,
    http_date,
    new_customer,
    payment,
)

pytestmark = pytest.mark.slow

DATE = 1_800_000_000.0  # the server's clock in made-up answers; the client's is far off
NOT_REPLAYABLE = Answer(
    409,
    (("content-type", "application/problem+json"),),
    json.dumps(
        {
            "type": "https://oncely.dev/problems/response-not-replayable",
            "title": "The operation completed, but its response cannot be replayed",
            "status": 409,
        }
    ).encode(),
)


@dataclass(frozen=True)
class Case:
    name: str
    script: list[Action]
    status: int | None = 201  # None: raises
    raises: type[Exception] | None = None
    attempts: int = 1
    stopped: str | None = "success"
    sleeps: list[float] = field(default_factory=list)
    payments: int = 1
    replayed: bool = False
    method: str = "POST"
    amount: int = 1000
    extension: dict[str, Any] | None = None
    policy: RetryPolicy | None = None
    random: float = 0.0
    same_key: bool = True


CASES = [
    Case("a lost answer is retried with the same key and replayed", [LOSE], attempts=2,
         replayed=True),
    Case("a timeout after sending is retried with the same key", [TIMEOUT], attempts=2,
         replayed=True),
    Case("a refused connection is retried", [REFUSE], attempts=2),
    Case("503 waits uniform(0, 1 s) first", [answer(503)], attempts=2, random=0.5,
         sleeps=[0.5]),
    Case("500 waits uniform(0, 0.25 s) first", [answer(500)], attempts=2, random=0.5,
         sleeps=[0.125]),
    Case("the backoff doubles", [answer(502), answer(504)], attempts=3, random=0.5,
         sleeps=[0.125, 0.25]),
    Case("three attempts at most", [answer(502)] * 5, status=502, attempts=3, random=0.5,
         sleeps=[0.125, 0.25], stopped="attempts", payments=0),
    Case("408, 425 and 429 are retried", [answer(408), answer(425), answer(429)],
         policy=RetryPolicy(attempts=4), attempts=4),
    Case("Retry-After in seconds is honoured", [answer(503, retry_after="7")], attempts=2,
         sleeps=[7.0]),
    Case("Retry-After as an HTTP-date is read against the answer's Date",
         [answer(503, date=http_date(DATE), retry_after=http_date(DATE + 5))], attempts=2,
         sleeps=[5.0]),
    Case("a backoff longer than Retry-After wins", [answer(503, retry_after="0")], attempts=2,
         random=0.5, sleeps=[0.5]),
    Case("a Retry-After over retry_after_max raises RetryLater at once",
         [answer(503, retry_after="120")], status=None, raises=RetryLater, payments=0),
    Case("a Retry-After past the deadline raises RetryLater at once",
         [answer(503, retry_after="20")], status=None, raises=RetryLater, payments=0,
         policy=RetryPolicy(deadline=10)),
    Case("no sleep ends past the deadline", [answer(503)] * 3, status=503, attempts=2,
         random=0.99, sleeps=[0.99], stopped="deadline", payments=0,
         policy=RetryPolicy(deadline=2.5)),
    Case("400 is not retried", [answer(400)], status=400, stopped="not_retryable", payments=0),
    Case("410 is not retried", [answer(410)], status=410, stopped="not_retryable", payments=0),
    Case("a real 422 (validation) is not retried", [], status=422, amount=-5,
         stopped="not_retryable", payments=0),
    Case("409 not-replayable is not retried", [NOT_REPLAYABLE], status=409,
         stopped="not_retryable", payments=0),
    Case("an answer marked Idempotent-Replayed is not retried",
         [answer(503, idempotent_replayed="true")], status=503, replayed=True,
         stopped="not_retryable", payments=0),
    Case("a keyless POST is not retried after a read timeout", [TIMEOUT], status=None,
         raises=httpx.ReadTimeout, payments=0, extension={"key": False}),
    Case("a keyless POST is not retried after a lost answer", [LOSE], status=None,
         raises=httpx.ReadError, payments=0, extension={"key": False}),
    Case("a keyless POST is not retried on 503", [answer(503)], status=503,
         stopped="not_retryable", payments=0, extension={"key": False}),
    Case("a keyless POST is retried when it was never sent", [REFUSE], status=400,
         attempts=2, stopped="not_retryable", payments=0, extension={"key": False}),
    Case("a GET is retried without a key", [TIMEOUT, answer(503)], status=200, attempts=3,
         method="GET", payments=0),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_retry_table(case: Case, service: Service, make_client: MakeClient) -> None:
    """Each case: the answer, how many attempts reached the wire, the sleeps, the ledger."""
    customer = new_customer()
    client = make_client(service.url, case.script, random=case.random, policy=case.policy)
    kwargs: dict[str, Any] = {}
    if case.method == "POST":
        kwargs["json"] = payment(customer, case.amount)
        path = "/payments"
    else:
        path = f"/payments?customer={customer}"
    if case.extension is not None:
        kwargs["extensions"] = {"oncely": case.extension}

    if case.raises is not None:
        with pytest.raises(case.raises) as caught:
            await client.request(case.method, path, **kwargs)
        if isinstance(caught.value, RetryLater):
            assert caught.value.key == client.faults.keys()[0]
            assert caught.value.delay in (120.0, 20.0)
            assert caught.value.status == 503
        else:
            notes = " ".join(getattr(caught.value, "__notes__", []))
            assert "stopped: not_retryable" in notes
    else:
        response = await client.request(case.method, path, **kwargs)
        assert response.status_code == case.status, response.text
        report = response.extensions["oncely"]
        assert report["attempts"] == case.attempts
        assert report["stopped"] == case.stopped
        assert report["replayed"] is case.replayed
        assert [a["sleep"] for a in report["history"] if a["sleep"]] == case.sleeps
        assert len(report["history"]) == case.attempts
        assert report["key"] == client.faults.keys()[0]

    assert client.faults.attempts == case.attempts
    assert client.time.sleeps == case.sleeps
    keys = client.faults.keys()
    assert len(set(keys)) == 1, keys  # one key (or none) for every attempt
    if case.method == "GET" or case.extension == {"key": False}:
        assert keys[0] is None
    else:
        assert keys[0] is not None
    assert len(service.payments(customer)) == case.payments
