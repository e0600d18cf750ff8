"""Orders: create (idempotent), read, list, change with If-Match/ETag, delete."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from payments_testing import OTHER_API_KEY, Ledger, auth, new_key, pay


def order(customer: str = "cus_1", currency: str = "USD", **extra: Any) -> dict[str, Any]:
    return {
        "customer": customer,
        "currency": currency,
        "items": [
            {"sku": "mug", "quantity": 2, "unit_amount": 1200},
            {"sku": "tea", "quantity": 1, "unit_amount": 600},
        ],
        **extra,
    }


async def create(
    client: httpx.AsyncClient, api_key: str | None = None, **fields: Any
) -> httpx.Response:
    headers = auth(key=new_key()) if api_key is None else auth(api_key, new_key())
    response = await client.post("/orders", json=order(**fields), headers=headers)
    assert response.status_code == 201, response.text
    return response


async def test_an_order_is_created_once_with_an_etag(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    key = new_key()
    first = await client.post("/orders", json=order(note="gift"), headers=auth(key=key))
    assert first.status_code == 201
    body = first.json()
    assert body["id"].startswith("ord_")
    assert (body["amount"], body["status"], body["version"], body["note"]) == (
        3000,
        "open",
        1,
        "gift",
    )
    assert first.headers["location"] == f"/orders/{body['id']}"
    assert first.headers["etag"] == f'"{body["id"]}.v1"'

    again = await client.post("/orders", json=order(note="gift"), headers=auth(key=key))
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["etag"] == first.headers["etag"]
    assert ledger.orders() == 1

    fetched = await client.get(f"/orders/{body['id']}", headers=auth())
    assert fetched.status_code == 200
    assert fetched.json() == body
    assert fetched.headers["etag"] == first.headers["etag"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"items": []}, "items"),
        ({"items": [{"sku": "mug", "quantity": 0, "unit_amount": 1}]}, "items.0.quantity"),
        ({"items": [{"sku": "", "quantity": 1, "unit_amount": 1}]}, "items.0.sku"),
        ({"items": [{"sku": "m", "quantity": 1, "unit_amount": -1}]}, "items.0.unit_amount"),
        ({"currency": "EURO"}, "currency"),
        ({"customer": ""}, "customer"),
        ({"status": "paid"}, "status"),
    ],
)
async def test_an_invalid_order_is_422_and_nothing_is_written(
    client: httpx.AsyncClient, ledger: Ledger, changes: dict[str, Any], field: str
) -> None:
    response = await client.post("/orders", json={**order(), **changes}, headers=auth(key="k"))
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == [field]
    assert ledger.orders() == 0


async def test_a_change_needs_the_current_etag(client: httpx.AsyncClient) -> None:
    """No If-Match: 428. A stale or weak one: 412. The current one: 200 and a new ETag."""
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    etag = created.headers["etag"]

    missing = await client.patch(url, json={"note": "x"}, headers=auth())
    assert missing.status_code == 428
    assert missing.json()["type"].endswith("/precondition-required")

    changed = await client.patch(
        url, json={"note": "ring twice"}, headers=auth(**{"If-Match": etag})
    )
    assert changed.status_code == 200
    assert changed.json()["note"] == "ring twice"
    assert changed.json()["version"] == 2
    assert changed.headers["etag"] != etag

    for stale in (etag, f"W/{changed.headers['etag']}", '"something else"'):
        refused = await client.patch(
            url, json={"note": "lost"}, headers=auth(**{"If-Match": stale})
        )
        assert refused.status_code == 412
        assert refused.json()["type"].endswith("/precondition-failed")
    listed = f'"nope", {changed.headers["etag"]}'
    ok = await client.patch(url, json={"note": None}, headers=auth(**{"If-Match": listed}))
    assert ok.status_code == 200
    assert ok.json()["note"] is None
    anything = await client.patch(url, json={"note": "any"}, headers=auth(**{"If-Match": "*"}))
    assert anything.json()["version"] == 4
    assert (await client.get(url, headers=auth())).headers["etag"] == anything.headers["etag"]


async def test_a_keyed_change_is_replayed_not_refused_as_stale(client: httpx.AsyncClient) -> None:
    """A retried PATCH with its Idempotency-Key gets its first answer, though its ETag is old."""
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    headers = auth(key=new_key(), **{"If-Match": created.headers["etag"]})
    first = await client.patch(url, json={"note": "once"}, headers=headers)
    again = await client.patch(url, json={"note": "once"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["etag"] == first.headers["etag"]
    assert (await client.get(url, headers=auth())).json()["version"] == 2


async def test_status_changes_follow_the_order_lifecycle(client: httpx.AsyncClient) -> None:
    created = await create(client)
    order_id = created.json()["id"]
    url = f"/orders/{order_id}"

    async def patch(body: dict[str, Any]) -> httpx.Response:
        etag = (await client.get(url, headers=auth())).headers["etag"]
        return await client.patch(url, json=body, headers=auth(**{"If-Match": etag}))

    assert (await patch({"status": "fulfilled"})).status_code == 409
    assert (await patch({})).status_code == 422
    assert (await patch({"status": "paid"})).status_code == 422  # which payment?
    assert (await patch({"note": "x", "payment": "pay_1"})).status_code == 422

    wrong_amount = (await pay(client, amount=999)).json()["id"]
    declined = (await pay(client, amount=3000, customer="cus_decline_1")).json()["payment"]["id"]
    for payment_id in (wrong_amount, declined, "pay_missing"):
        refused = await patch({"status": "paid", "payment": payment_id})
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["field"] == "payment"

    paying = (await pay(client, amount=3000)).json()["id"]
    paid = await patch({"status": "paid", "payment": paying})
    assert paid.status_code == 200
    assert (paid.json()["status"], paid.json()["payment"]) == ("paid", paying)

    other = (await create(client)).json()["id"]
    other_etag = (await client.get(f"/orders/{other}", headers=auth())).headers["etag"]
    twice = await client.patch(
        f"/orders/{other}",
        json={"status": "paid", "payment": paying},
        headers=auth(**{"If-Match": other_etag}),
    )
    assert twice.status_code == 422

    new_items = [{"sku": "mug", "quantity": 1, "unit_amount": 1}]
    assert (await patch({"items": new_items})).status_code == 409
    assert (await patch({"status": "fulfilled"})).json()["status"] == "fulfilled"
    assert (await patch({"status": "cancelled"})).status_code == 409


async def test_items_change_while_open_and_the_amount_follows(client: httpx.AsyncClient) -> None:
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    changed = await client.patch(
        url,
        json={"items": [{"sku": "pot", "quantity": 3, "unit_amount": 500}]},
        headers=auth(**{"If-Match": created.headers["etag"]}),
    )
    assert changed.json()["amount"] == 1500
    assert changed.json()["items"] == [{"sku": "pot", "quantity": 3, "unit_amount": 500}]


async def test_a_deleted_order_is_gone(client: httpx.AsyncClient) -> None:
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    etag = created.headers["etag"]
    changed = await client.patch(url, json={"note": "x"}, headers=auth(**{"If-Match": etag}))

    stale = await client.delete(url, headers=auth(**{"If-Match": etag}))
    assert stale.status_code == 412
    deleted = await client.delete(url, headers=auth(**{"If-Match": changed.headers["etag"]}))
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await client.get(url, headers=auth())).status_code == 404
    assert (await client.delete(url, headers=auth())).status_code == 404
    gone = await client.patch(url, json={"note": "y"}, headers=auth(**{"If-Match": "*"}))
    assert gone.status_code == 404
    listed = (await client.get("/orders", headers=auth())).json()
    assert listed == {"data": [], "has_more": False}

    other = await create(client)
    assert (await client.delete(f"/orders/{other.json()['id']}", headers=auth())).status_code == 204


async def test_orders_are_filtered_and_paged(client: httpx.AsyncClient) -> None:
    made = [(await create(client, customer=f"cus_{n % 2}")).json() for n in range(7)]
    first = made[0]
    cancelled = await client.patch(
        f"/orders/{first['id']}",
        json={"status": "cancelled"},
        headers=auth(**{"If-Match": f'"{first["id"]}.v1"'}),
    )
    assert cancelled.status_code == 200

    page = (await client.get("/orders?limit=3", headers=auth())).json()
    assert [o["id"] for o in page["data"]] == [o["id"] for o in reversed(made)][:3]
    assert page["has_more"] is True
    rest = (
        await client.get(
            "/orders",
            params={"limit": 100, "starting_after": page["data"][-1]["id"]},
            headers=auth(),
        )
    ).json()
    assert [o["id"] for o in rest["data"]] == [o["id"] for o in reversed(made)][3:]
    assert rest["has_more"] is False

    by_status = (await client.get("/orders?status=cancelled", headers=auth())).json()
    assert [o["id"] for o in by_status["data"]] == [first["id"]]
    open_cus_1 = (await client.get("/orders?status=open&customer=cus_1", headers=auth())).json()
    assert [o["id"] for o in open_cus_1["data"]] == [
        o["id"] for o in reversed(made) if o["customer"] == "cus_1"
    ]
    assert (await client.get("/orders?status=lost", headers=auth())).status_code == 422
    assert (await client.get("/orders?limit=101", headers=auth())).status_code == 422


async def test_tenants_never_touch_each_others_orders(client: httpx.AsyncClient) -> None:
    created = await create(client)
    url = f"/orders/{created.json()['id']}"
    bob = auth(OTHER_API_KEY, **{"If-Match": "*"})
    assert (await client.get(url, headers=bob)).status_code == 404
    assert (await client.patch(url, json={"note": "bob"}, headers=bob)).status_code == 404
    assert (await client.delete(url, headers=bob)).status_code == 404
    assert (await client.get("/orders", headers=bob)).json()["data"] == []
    assert (await client.get(url, headers=auth())).json() == created.json()
