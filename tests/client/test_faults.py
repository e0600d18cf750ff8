"""The claims of the client half, over real HTTP: lost answers, a request still in flight, a
whole outage. Both transports, the real payments service, faults injected on the wire."""

from __future__ import annotations

import httpx
import pytest

from oncely.client import SHARED_BUDGET, RetryBudget

from ..realserver.conftest import free_port
from .conftest import MakeClient
from .support import BEHIND, LOSE, PASS, Service, answer, new_customer, payment

pytestmark = pytest.mark.slow

INTENDED = 20


async def test_lost_answers_give_one_payment_per_intended_payment(
    service: Service, make_client: MakeClient
) -> None:
    """Each first attempt reaches the server and its answer is lost: N intended payments are N
    ledger rows, every final answer is 201, and every second answer is a replay."""
    customer = new_customer()
    # Every request needs a retry here: far more than the default budget allows (see below).
    client = make_client(service.url, [LOSE, PASS] * INTENDED, budget=RetryBudget(cap=100))
    reports = []
    for amount in range(1, INTENDED + 1):
        response = await client.request("POST", "/payments", json=payment(customer, amount))
        assert response.status_code == 201, response.text
        reports.append(response.extensions["oncely"])

    assert [r["attempts"] for r in reports] == [2] * INTENDED
    assert all(r["replayed"] for r in reports)
    assert [[a["error"] for a in r["history"]] for r in reports] == [["ReadError", None]] * INTENDED
    keys = client.faults.keys()
    assert keys[0::2] == keys[1::2]  # each retry carried its first attempt's key
    assert len(set(keys)) == INTENDED
    ledger = service.payments(customer)
    assert sorted(row["amount"] for row in ledger) == list(range(1, INTENDED + 1))


async def test_a_409_while_the_first_attempt_runs_is_retried_until_the_replay(
    slow_service: Service, make_client: MakeClient
) -> None:
    """The first attempt times out while the server still works on it; the retry gets 409 (in
    flight) with Retry-After: 1, waits for it, and the next retry gets the replay."""
    customer = new_customer()
    client = make_client(slow_service.url, [BEHIND])
    # The first attempt's payment exists before the client gives up on it: it is in flight.
    client.faults.hook = lambda request: (
        slow_service.wait_for_payment(customer, settled=False) if client.faults.behind else None
    )
    client.time.on_sleep = client.faults.wait_behind  # the sleep lets the first one finish

    response = await client.request("POST", "/payments", json=payment(customer))

    assert response.status_code == 201
    report = response.extensions["oncely"]
    assert [(a["status"], a["error"]) for a in report["history"]] == [
        (None, "ReadTimeout"),
        (409, None),
        (201, None),
    ]
    assert report["history"][1]["reason"] == "in flight"
    assert report["replayed"] is True
    assert client.time.sleeps == [1.0]  # the 409's Retry-After
    assert client.faults.behind_answers[0].status_code == 201
    assert len(set(client.faults.keys())) == 1
    assert len(slow_service.payments(customer)) == 1


async def test_an_outage_spends_the_budget_and_then_stops_retrying_and_says_so(
    make_client: MakeClient,
) -> None:
    """Nothing listens: 5 requests spend the 10 tokens on 2 retries each; the next 3 get one
    attempt each, and their errors name the budget."""
    client = make_client(f"http://127.0.0.1:{free_port()}", budget=RetryBudget())
    notes = []
    for _ in range(8):
        with pytest.raises(httpx.ConnectError) as caught:
            await client.request("POST", "/payments", json=payment(new_customer()))
        notes.append(" ".join(caught.value.__notes__))
    assert client.faults.attempts == 5 * 3 + 3 * 1  # 10 retries, the budget's cap
    assert all("stopped: attempts" in note for note in notes[:5])
    assert all("stopped: budget" in note for note in notes[5:])
    assert "retry budget for this origin is exhausted" in notes[-1]


async def test_an_outage_of_503s_stops_on_the_budget_and_reports_it(
    make_client: MakeClient,
) -> None:
    """Made-up 503s: the last answers come back with ``stopped == "budget"``; a success adds
    0.1 token, which is not enough for a retry."""
    budget = RetryBudget()
    client = make_client("http://127.0.0.1:9", [answer(503)] * 100, budget=budget)
    stops = []
    for _ in range(7):
        response = await client.request("POST", "/payments", json=payment(new_customer()))
        stops.append(response.extensions["oncely"]["stopped"])
    assert stops == ["attempts"] * 5 + ["budget"] * 2
    assert client.faults.attempts == 17
    assert budget.tokens("http://127.0.0.1:9") == 0.0
    # A 503 is no success, even when it is not retried (no key): it earns no token.
    await client.request(
        "POST", "/payments", json=payment(new_customer()), extensions={"oncely": {"key": False}}
    )
    assert budget.tokens("http://127.0.0.1:9") == 0.0
    # A real answer does: 0.1.
    client.faults.script[:] = [answer(201)]
    await client.request("POST", "/payments", json=payment(new_customer()))
    assert budget.tokens("http://127.0.0.1:9") == 0.1


async def test_every_transport_in_the_process_shares_one_budget_per_origin(
    make_client: MakeClient,
) -> None:
    """Two transports on the default budget: together they retry 10 times, not 20."""
    origin = f"http://127.0.0.1:{free_port()}"  # an origin no other test has used
    clients = [make_client(origin, budget=SHARED_BUDGET) for _ in range(2)]
    for _ in range(6):
        for client in clients:
            with pytest.raises(httpx.ConnectError):
                await client.request("POST", "/payments", json=payment(new_customer()))
    attempts = sum(client.faults.attempts for client in clients)
    assert attempts == 12 + 10
    assert SHARED_BUDGET.tokens(origin) == 0.0
