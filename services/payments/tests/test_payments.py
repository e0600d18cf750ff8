"""POST /payments and friends, in-process: each answer, and what the ledger and network hold."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest

from oncely_payments import Service
from payments_testing import (
    API_KEY,
    OTHER_API_KEY,
    Ledger,
    Network,
    auth,
    new_key,
    pay,
    payment,
)


async def test_a_payment_is_created_once_and_its_bytes_are_replayed(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    """201 with the payment and Location; a repeat gets the same bytes, and nothing runs."""
    key = new_key()
    first = await pay(client, key, amount=2500, currency="EUR", customer="cus_42")
    assert first.status_code == 201
    body = first.json()
    assert set(body) == {"id", "amount", "currency", "customer", "status"}
    assert body["id"].startswith("pay_")
    assert (body["amount"], body["currency"], body["customer"], body["status"]) == (
        2500,
        "EUR",
        "cus_42",
        "succeeded",
    )
    assert first.headers["location"] == f"/payments/{body['id']}"
    assert first.headers["content-type"] == "application/json"
    assert "idempotent-replayed" not in first.headers

    again = await pay(client, key, amount=2500, currency="EUR", customer="cus_42")
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]

    [row] = ledger.payments()
    assert (row["id"], row["status"]) == (body["id"], "succeeded")
    [charge] = network.charges()
    assert charge["outcome"] == "approved"
    assert row["charge_id"] == charge["id"]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz", "sk_test_alice"],
)
async def test_requests_without_a_bearer_api_key_are_401(
    client: httpx.AsyncClient, ledger: Ledger, authorization: str | None
) -> None:
    headers = {"Idempotency-Key": new_key()}
    if authorization is not None:
        headers["Authorization"] = authorization
    for response in (
        await client.post("/payments", json=payment(), headers=headers),
        await client.get("/payments", headers=headers),
        await client.get("/orders", headers=headers),
    ):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["type"].endswith("/unauthorized")
    assert ledger.count() == 0


async def test_health_and_docs_need_no_api_key(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert {"/payments", "/payments/{payment_id}", "/orders", "/orders/{order_id}"} <= set(
        schema["paths"]
    )


@pytest.mark.parametrize("path", ["/payments", "/orders"])
async def test_a_post_without_an_idempotency_key_is_400(
    client: httpx.AsyncClient, ledger: Ledger, path: str
) -> None:
    response = await client.post(path, json=payment(), headers=auth())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "https://oncely.dev/problems/missing-idempotency-key"
    assert ledger.count() == 0
    assert ledger.orders() == 0


INVALID_PAYMENTS: list[tuple[Any, set[str]]] = [
    ({"amount": 0, "currency": "USD", "customer": "c"}, {"amount"}),
    ({"amount": -5, "currency": "USD", "customer": "c"}, {"amount"}),
    ({"amount": "100", "currency": "USD", "customer": "c"}, {"amount"}),
    ({"amount": 10.5, "currency": "USD", "customer": "c"}, {"amount"}),
    ({"amount": True, "currency": "USD", "customer": "c"}, {"amount"}),
    ({"amount": 10**15, "currency": "USD", "customer": "c"}, {"amount"}),
    ({"amount": 100, "currency": "usd", "customer": "c"}, {"currency"}),
    ({"amount": 100, "currency": "US", "customer": "c"}, {"currency"}),
    ({"amount": 100, "currency": "ABC", "customer": "c"}, {"currency"}),
    ({"amount": 100, "currency": "XXX", "customer": "c"}, {"currency"}),
    ({"amount": 100, "currency": "USD", "customer": ""}, {"customer"}),
    ({"amount": 100, "currency": "USD", "customer": 7}, {"customer"}),
    ({"amount": 100, "currency": "USD"}, {"customer"}),
    ({"amount": 100, "currency": "USD", "customer": "c", "tip": 5}, {"tip"}),
    ({}, {"amount", "currency", "customer"}),
    ([1, 2], {"body"}),
]


@pytest.mark.parametrize(("body", "fields"), INVALID_PAYMENTS)
async def test_an_invalid_payment_is_422_listing_its_fields_before_any_side_effect(
    client: httpx.AsyncClient,
    ledger: Ledger,
    network: Network,
    body: Any,
    fields: set[str],
) -> None:
    response = await client.post("/payments", json=body, headers=auth(key=new_key()))
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/validation-error")
    assert {error["field"] for error in problem["errors"]} == fields
    assert ledger.count() == 0
    assert network.charges() == []
    assert network.calls() == 0


async def test_a_body_that_is_not_json_is_422(client: httpx.AsyncClient, ledger: Ledger) -> None:
    response = await client.post(
        "/payments",
        content=b"{amount: 1",
        headers={**auth(key=new_key()), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"
    assert ledger.count() == 0


async def test_a_key_reused_for_another_payment_is_refused(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    key = new_key()
    assert (await pay(client, key, amount=100)).status_code == 201
    reused = await pay(client, key, amount=200)
    assert reused.status_code == 422
    assert reused.json()["type"] == "https://oncely.dev/problems/idempotency-key-reused"
    assert ledger.count() == 1


async def test_tenants_never_see_or_replay_each_others_payments(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    """Bob, sending Alice's key and body, gets a payment of his own, not Alice's answer."""
    key = new_key()
    alice = await pay(client, key, api_key=API_KEY, customer="cus_shared")
    bob = await pay(client, key, api_key=OTHER_API_KEY, customer="cus_shared")
    assert alice.status_code == bob.status_code == 201
    assert "idempotent-replayed" not in bob.headers
    assert alice.json()["id"] != bob.json()["id"]

    alice_id = alice.json()["id"]
    hidden = await client.get(f"/payments/{alice_id}", headers=auth(OTHER_API_KEY))
    assert hidden.status_code == 404
    assert hidden.headers["content-type"] == "application/problem+json"
    assert (await client.get(f"/payments/{alice_id}", headers=auth(API_KEY))).json() == (
        alice.json()
    )
    for api_key, own in ((API_KEY, alice), (OTHER_API_KEY, bob)):
        listed = await client.get("/payments?customer=cus_shared", headers=auth(api_key))
        assert listed.json() == {"data": [own.json()], "has_more": False}
    cursor = await client.get(
        "/payments", params={"starting_after": alice_id}, headers=auth(OTHER_API_KEY)
    )
    assert cursor.status_code == 422

    assert ledger.count() == 2
    assert len({row["tenant"] for row in ledger.payments()}) == 2
    assert all(API_KEY not in str(row) for row in ledger.payments())
    assert len(network.charges()) == 2


async def test_a_declined_payment_is_recorded_once_as_failed_and_its_402_replayed(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    key = new_key()
    first = await pay(client, key, customer="cus_decline_insufficient_funds")
    assert first.status_code == 402
    assert first.headers["content-type"] == "application/problem+json"
    problem = first.json()
    assert problem["type"].endswith("/card-declined")
    assert problem["decline_code"] == "card_declined"
    assert problem["payment"]["status"] == "failed"
    assert first.headers["location"] == f"/payments/{problem['payment']['id']}"

    again = await pay(client, key, customer="cus_decline_insufficient_funds")
    assert again.status_code == 402
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content

    [row] = ledger.payments()
    assert (row["id"], row["status"]) == (problem["payment"]["id"], "failed")
    [charge] = network.charges()
    assert charge["outcome"] == "declined"
    assert network.calls() == 1
    fetched = await client.get(f"/payments/{row['id']}", headers=auth())
    assert fetched.json() == problem["payment"]


async def test_a_flaky_customer_gets_503_then_201_with_one_payment_and_one_charge(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    """The 503 releases the key but keeps its recovery point: the retry reuses the payment."""
    key = new_key()
    first = await pay(client, key, customer="cus_flaky_1")
    assert first.status_code == 503
    assert first.headers["retry-after"] == "1"
    assert first.json()["type"].endswith("/card-network-unavailable")
    [pending] = ledger.payments()
    assert pending["status"] == "pending"
    assert network.charges() == []
    shown = await client.get(f"/payments/{pending['id']}", headers=auth())
    assert shown.json()["status"] == "pending"

    retry = await pay(client, key, customer="cus_flaky_1")
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert retry.json()["id"] == pending["id"]
    [row] = ledger.payments()
    assert row["status"] == "succeeded"
    [charge] = network.charges()
    assert row["charge_id"] == charge["id"]
    assert network.calls() == 2

    replay = await pay(client, key, customer="cus_flaky_1")
    assert replay.content == retry.content
    assert replay.headers["idempotent-replayed"] == "true"
    # Each idempotency key is flaky once: a new key fails first too.
    assert (await pay(client, new_key(), customer="cus_flaky_1")).status_code == 503


class Always(random.Random):
    """A random source that always rolls ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("roll", "charged_before_retry"),
    [(0.7, 0), (0.0, 1)],
    ids=["failed-before-charging", "answer-lost-after-charging"],
)
async def test_a_network_failure_is_503_and_the_retry_charges_at_most_once(
    service: Service,
    client: httpx.AsyncClient,
    ledger: Ledger,
    network: Network,
    roll: float,
    charged_before_retry: int,
) -> None:
    service.network.failure_rate = 1.0
    service.network.rng = Always(roll)
    key = new_key()
    failed = await pay(client, key)
    assert failed.status_code == 503
    assert len(network.charges()) == charged_before_retry

    service.network.failure_rate = 0.0
    retry = await pay(client, key)
    assert retry.status_code == 201
    assert ledger.count() == 1
    [charge] = network.charges()
    assert ledger.payments()[0]["charge_id"] == charge["id"]


async def test_a_concurrent_duplicate_is_409_while_the_first_runs(
    service: Service, client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    service.network.latency_ms = 300
    key = new_key()
    first = asyncio.create_task(pay(client, key))
    await asyncio.sleep(0.1)
    duplicate = await pay(client, key)
    assert duplicate.status_code == 409
    assert duplicate.headers["retry-after"] == "1"
    assert (await first).status_code == 201
    assert ledger.count() == 1
    assert len(network.charges()) == 1


async def test_payments_are_listed_newest_first_in_pages(client: httpx.AsyncClient) -> None:
    made = []
    for n in range(23):
        response = await pay(client, amount=100 + n, customer="cus_a" if n % 3 else "cus_b")
        made.append(response.json())
    newest_first = list(reversed(made))

    page = (await client.get("/payments", headers=auth())).json()
    assert page["data"] == newest_first[:10]
    assert page["has_more"] is True

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 7}
        if cursor is not None:
            params["starting_after"] = cursor
        listed = (await client.get("/payments", params=params, headers=auth())).json()
        seen.extend(listed["data"])
        if not listed["has_more"]:
            break
        cursor = listed["data"][-1]["id"]
    assert seen == newest_first

    only_b = (await client.get("/payments?customer=cus_b&limit=100", headers=auth())).json()
    assert only_b == {
        "data": [p for p in newest_first if p["customer"] == "cus_b"],
        "has_more": False,
    }
    last = (
        await client.get("/payments", params={"starting_after": made[0]["id"]}, headers=auth())
    ).json()
    assert last == {"data": [], "has_more": False}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("starting_after=pay_nope", "starting_after"),
        ("customer=", "customer"),
    ],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, query: str, field: str
) -> None:
    response = await client.get(f"/payments?{query}", headers=auth())
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == [field]


async def test_unknown_payments_and_routes_are_404_problems(client: httpx.AsyncClient) -> None:
    for path in ("/payments/pay_missing", "/nowhere"):
        response = await client.get(path, headers=auth())
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert json.loads(response.content)["status"] == 404


async def test_metrics_count_each_decision_by_outcome_and_route_template(
    client: httpx.AsyncClient,
) -> None:
    """GET /metrics (no API key) is the text exposition: one executed and one replayed
    decision under the route template, never the raw key."""
    key = new_key()
    for _ in range(2):
        assert (await pay(client, key, amount=100, currency="EUR")).status_code == 201
    page = await client.get("/metrics")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    text = page.text
    for outcome in ("executed", "replayed"):
        line = f'oncely_decisions_total{{outcome="{outcome}",route="/payments",surface="asgi"}} 1.0'
        assert line in text
    assert "oncely_store_operation_duration_seconds_bucket" in text
    assert key not in text
