"""PUT /orders/{id} (full replace, If-Match) and POST /orders/{id}/pay (one charge per order)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from payments_testing import Ledger, Network, auth, new_key
from test_orders import create, order

NEW_ITEMS = [{"sku": "pot", "quantity": 3, "unit_amount": 500}]


async def test_put_replaces_the_whole_order_with_the_current_etag(
    client: httpx.AsyncClient,
) -> None:
    """No If-Match: 428. Stale: 412. Current: 200, new content, new ETag; a left-out note clears."""
    created = await create(client, note="gift")
    url = f"/orders/{created.json()['id']}"
    etag = created.headers["etag"]
    new = {"customer": "cus_2", "currency": "EUR", "items": NEW_ITEMS}

    missing = await client.put(url, json=new, headers=auth())
    assert missing.status_code == 428
    assert missing.json()["type"].endswith("/precondition-required")

    replaced = await client.put(url, json=new, headers=auth(**{"If-Match": etag}))
    assert replaced.status_code == 200, replaced.text
    body = replaced.json()
    assert (body["customer"], body["currency"], body["items"], body["amount"]) == (
        "cus_2",
        "EUR",
        NEW_ITEMS,
        1500,
    )
    assert (body["note"], body["status"], body["version"]) == (None, "open", 2)
    assert replaced.headers["etag"] not in (etag, None)
    assert (await client.get(url, headers=auth())).json() == body

    stale = await client.put(url, json=new, headers=auth(**{"If-Match": etag}))
    assert stale.status_code == 412
    assert stale.json()["type"].endswith("/precondition-failed")


async def test_put_validates_the_whole_body_and_finds_the_order(
    client: httpx.AsyncClient,
) -> None:
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    headers = auth(**{"If-Match": created.headers["etag"]})
    partial = await client.put(url, json={"note": "only a note"}, headers=headers)
    assert partial.status_code == 422
    assert {e["field"] for e in partial.json()["errors"]} == {"customer", "currency", "items"}
    status = await client.put(url, json={**order(), "status": "paid"}, headers=headers)
    assert status.status_code == 422
    missing = await client.put("/orders/ord_missing", json=order(), headers=headers)
    assert missing.status_code == 404
    assert (await client.get(url, headers=auth())).json()["version"] == 1


async def test_a_keyed_put_is_replayed(client: httpx.AsyncClient) -> None:
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    headers = auth(key=new_key(), **{"If-Match": created.headers["etag"]})
    first = await client.put(url, json=order(note="once"), headers=headers)
    again = await client.put(url, json=order(note="once"), headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert (await client.get(url, headers=auth())).json()["version"] == 2


async def pay_order(
    client: httpx.AsyncClient, order_id: str, key: str | None = None
) -> httpx.Response:
    return await client.post(f"/orders/{order_id}/pay", headers=auth(key=key or new_key()))


async def test_paying_an_order_charges_its_total_once_and_marks_it_paid(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    created = (await create(client, customer="cus_77")).json()
    key = new_key()
    first = await pay_order(client, created["id"], key)
    assert first.status_code == 201, first.text
    payment = first.json()
    assert payment["id"].startswith("pay_")
    assert (payment["amount"], payment["currency"], payment["customer"]) == (3000, "USD", "cus_77")
    assert (payment["status"], payment["order"]) == ("succeeded", created["id"])
    assert first.headers["location"] == f"/payments/{payment['id']}"

    again = await pay_order(client, created["id"], key)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content

    paid = await client.get(f"/orders/{created['id']}", headers=auth())
    assert (paid.json()["status"], paid.json()["payment"], paid.json()["version"]) == (
        "paid",
        payment["id"],
        2,
    )
    listed = (await client.get("/payments?customer=cus_77", headers=auth())).json()
    assert listed == {"data": [payment], "has_more": False}
    assert (await client.get(f"/payments/{payment['id']}", headers=auth())).json() == payment

    [row] = ledger.payments()
    assert (row["id"], row["amount"], row["status"]) == (payment["id"], 3000, "succeeded")
    [charge] = network.charges()
    assert (charge["amount"], charge["customer"], charge["outcome"]) == (3000, "cus_77", "approved")


async def test_paying_a_paid_order_under_another_key_is_409_not_a_second_charge(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    order_id = (await create(client)).json()["id"]
    paid = await pay_order(client, order_id)
    assert paid.status_code == 201
    twice = await pay_order(client, order_id)
    assert twice.status_code == 409
    problem = twice.json()
    assert problem["type"].endswith("/order-already-paid")
    assert problem["payment"] == paid.json()["id"]
    assert order_id in problem["detail"]
    assert ledger.count() == 1
    assert len(network.charges()) == 1


async def test_paying_needs_a_key_an_order_and_an_open_one(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    created = await create(client)
    order_id = created.json()["id"]
    keyless = await client.post(f"/orders/{order_id}/pay", headers=auth())
    assert keyless.status_code == 400
    assert keyless.json()["type"].endswith("/missing-idempotency-key")
    missing = await pay_order(client, "ord_missing")
    assert missing.status_code == 404
    cancel = {"status": "cancelled"}
    headers = auth(**{"If-Match": created.headers["etag"]})
    assert (await client.patch(f"/orders/{order_id}", json=cancel, headers=headers)).is_success
    cancelled = await pay_order(client, order_id)
    assert cancelled.status_code == 409
    assert cancelled.json()["current_status"] == "cancelled"
    assert ledger.count() == 0


async def test_a_declined_order_payment_leaves_the_order_open(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    order_id = (await create(client, customer="cus_decline_9")).json()["id"]
    declined = await pay_order(client, order_id)
    assert declined.status_code == 402
    failed = declined.json()["payment"]
    assert (failed["status"], failed["order"]) == ("failed", order_id)
    still = (await client.get(f"/orders/{order_id}", headers=auth())).json()
    assert (still["status"], still["payment"]) == ("open", None)
    assert [p["status"] for p in ledger.payments()] == ["failed"]


async def test_an_order_with_a_pending_payment_cannot_change_until_it_settles(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    """cus_flaky: the first charge fails (503) and the payment stays pending; the same key
    resumes it; meanwhile changes and other keys are 409, and nothing is charged twice."""
    created = await create(client, customer="cus_flaky_3")
    order_id = created.json()["id"]
    url = f"/orders/{order_id}"
    key = new_key()
    unavailable = await pay_order(client, order_id, key)
    assert unavailable.status_code == 503
    [pending] = ledger.payments()
    assert pending["status"] == "pending"

    headers = auth(**{"If-Match": created.headers["etag"]})
    blocked: list[httpx.Response] = [
        await client.patch(url, json={"note": "x"}, headers=headers),
        await client.put(url, json=order(customer="cus_flaky_3"), headers=headers),
        await client.delete(url, headers=headers),
        await pay_order(client, order_id),
    ]
    for response in blocked:
        assert response.status_code == 409, response.text
        assert response.json()["type"].endswith("/order-payment-pending")
        assert response.json()["payment"] == pending["id"]

    resumed = await pay_order(client, order_id, key)
    assert resumed.status_code == 201
    assert resumed.json()["id"] == pending["id"]
    assert (await client.get(url, headers=auth())).json()["status"] == "paid"
    assert ledger.count() == 1
    assert len(network.charges()) == 1


async def test_concurrent_payments_of_one_order_under_different_keys_charge_once(
    client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    order_id = (await create(client)).json()["id"]
    answers = await asyncio.gather(*(pay_order(client, order_id) for _ in range(6)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201, 409, 409, 409, 409, 409]
    refused: set[Any] = {
        a.json()["type"].rsplit("/", 1)[1] for a in answers if a.status_code == 409
    }
    assert refused <= {"order-already-paid", "order-payment-pending"}
    assert ledger.count() == 1
    assert len(network.charges()) == 1
