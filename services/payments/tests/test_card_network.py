"""The simulated card network: one charge per idempotency key, in a file of its own."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oncely_payments.card_network import CardNetwork, CardNetworkError, CardNetworkUnavailable


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[CardNetwork]:
    made = CardNetwork(tmp_path / "network.db", latency_ms=0)
    yield made
    await made.aclose()


async def test_a_repeated_key_answers_the_first_charge(network: CardNetwork) -> None:
    first = await network.charge("k1", amount=100, currency="USD", customer="cus_1")
    again = await network.charge("k1", amount=100, currency="USD", customer="cus_1")
    other = await network.charge("k2", amount=100, currency="USD", customer="cus_1")
    assert first == again
    assert first.approved
    assert other.id != first.id
    assert len(network.charges()) == 2


async def test_the_same_key_for_another_charge_is_refused(network: CardNetwork) -> None:
    await network.charge("k1", amount=100, currency="USD", customer="cus_1")
    with pytest.raises(CardNetworkError, match="another charge"):
        await network.charge("k1", amount=101, currency="USD", customer="cus_1")


async def test_declines_and_flaky_customers(network: CardNetwork) -> None:
    declined = await network.charge("d", amount=1, currency="EUR", customer="cus_decline_x")
    assert declined.outcome == "declined"
    assert (await network.charge("d", amount=1, currency="EUR", customer="cus_decline_x")) == (
        declined
    )
    for key in ("f1", "f2"):
        with pytest.raises(CardNetworkUnavailable):
            await network.charge(key, amount=1, currency="EUR", customer="cus_flaky_x")
        assert (
            await network.charge(key, amount=1, currency="EUR", customer="cus_flaky_x")
        ).approved
    assert [c[5] for c in network.charges()].count("approved") == 2


async def test_its_memory_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "network.db"
    first = CardNetwork(path, latency_ms=0)
    charge = await first.charge("k", amount=5, currency="JPY", customer="cus_1")
    await first.aclose()
    second = CardNetwork(path, latency_ms=0, failure_rate=1.0, rng=random.Random(1))
    second.failure_rate = 0.0
    assert await second.charge("k", amount=5, currency="JPY", customer="cus_1") == charge
    assert len(second.charges()) == 1
    await second.aclose()
