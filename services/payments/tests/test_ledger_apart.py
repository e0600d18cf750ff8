"""The ledger apart from the store (Redis): a phase run again writes nothing new.

With ``--database`` the ledger and oncely's records share no transaction, so a crash (or a pause
past the lease) between a ledger commit and the store's write runs the phase again. Here the
store's record is deleted outright, the worst case of that window: the request then runs again
from the start, and finds the rows and the charge its first run made, because their ids derive
from the tenant and the key.
"""

from __future__ import annotations

import httpx
import pytest

from oncely_payments import Settings
from payments_testing import Ledger, Network, auth, delete_prefix, new_key, payment
from test_orders import order


def _forget(settings: Settings) -> None:
    """The store loses every record of the test (its prefix): as if no write had landed."""
    assert delete_prefix(settings.store_prefix) > 0


# Only the conftest's Redis settings: the store on Redis, the ledger in a SQLite file apart.
pytestmark = pytest.mark.parametrize("settings", ["redis"], indirect=True)


async def test_a_payment_run_again_finds_its_payment_and_its_charge(
    settings: Settings, client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    assert not settings.shares_transaction
    key, body = new_key(), payment(amount=2500, customer="cus_again")
    first = await client.post("/payments", json=body, headers=auth(key=key))
    assert first.status_code == 201, first.text
    _forget(settings)
    again = await client.post("/payments", json=body, headers=auth(key=key))
    assert again.status_code == 201, again.text
    assert "idempotent-replayed" not in again.headers  # it ran again ...
    assert again.json() == first.json()  # ... to the same payment
    [row] = ledger.payments()
    assert (row["id"], row["status"]) == (first.json()["id"], "succeeded")
    [charge] = network.charges()
    assert row["charge_id"] == charge["id"]
    replayed = await client.post("/payments", json=body, headers=auth(key=key))
    assert replayed.headers["idempotent-replayed"] == "true"
    other = await client.post("/payments", json=body, headers=auth(key=new_key()))
    assert other.json()["id"] != first.json()["id"]
    assert ledger.count() == 2


async def test_the_same_key_with_another_payment_after_the_record_is_gone_is_refused(
    settings: Settings, client: httpx.AsyncClient, ledger: Ledger
) -> None:
    assert not settings.shares_transaction
    key = new_key()
    first = await client.post("/payments", json=payment(amount=100), headers=auth(key=key))
    assert first.status_code == 201
    _forget(settings)
    other = await client.post("/payments", json=payment(amount=999), headers=auth(key=key))
    assert other.status_code == 422
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert [row["amount"] for row in ledger.payments()] == [100]


async def test_an_order_created_and_paid_again_is_one_order_one_payment_one_charge(
    settings: Settings, client: httpx.AsyncClient, ledger: Ledger, network: Network
) -> None:
    assert not settings.shares_transaction
    order_key, pay_key = new_key(), new_key()
    created = await client.post("/orders", json=order(), headers=auth(key=order_key))
    assert created.status_code == 201, created.text
    _forget(settings)
    again = await client.post("/orders", json=order(), headers=auth(key=order_key))
    assert (again.status_code, again.json()) == (201, created.json())
    assert ledger.orders() == 1

    url = f"/orders/{created.json()['id']}/pay"
    paid = await client.post(url, headers=auth(key=pay_key))
    assert paid.status_code == 201, paid.text
    _forget(settings)
    # The order is paid by this key's payment: a run again goes on with it, not 409.
    paid_again = await client.post(url, headers=auth(key=pay_key))
    assert (paid_again.status_code, paid_again.json()) == (201, paid.json())
    [row] = ledger.payments()
    assert row["status"] == "succeeded"
    assert len(network.charges()) == 1
    got = await client.get(f"/orders/{created.json()['id']}", headers=auth())
    assert (got.json()["status"], got.json()["payment"]) == ("paid", row["id"])
    # Another key for the paid order is still refused.
    refused = await client.post(url, headers=auth(key=new_key()))
    assert refused.status_code == 409
