"""Store round trips per request, counted for real: a uvicorn server, its store behind a proxy.

The proxy reads every message the server sends the store and names the store's operations (see
``STORE_LABELS`` in conftest): for PostgreSQL a round trip is a ``Sync`` (or a simple ``Query``)
and a statement a ``Parse`` (or ``Query``); for Redis each command is a round trip. Redis also
counts for itself: ``INFO commandstats`` and ``total_reads_processed`` before and after. Other
clients of the same Redis can only add to its counters, so a measurement is taken again (a few
times at most) until one shows nothing but the request's own traffic; on a server kept busy by
others throughout, only the proxy's count is exact, and the server's is checked to include it.

Expected: 2 round trips for a new key (claim, complete), 1 for a replay (the claim finds the
answer), and none for lease renewal while the handler takes less than a third of the lease.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio

from .client import PAYLOAD, Answer, pay
from .conftest import Server, Servers, SharedStore
from .proxy import StoreProxy

pytestmark = pytest.mark.slow

LEASE = 3.0  # renewed every second while the handler runs
FAST = 0.1  # well under a third of the lease
SLOW = 1.6  # one renewal, at 1 s: shows that renewals would be counted
TRIES = 5


def body(delay: float) -> bytes:
    return json.dumps({**PAYLOAD, "delay": delay}).encode()


@dataclass
class Cost:
    """What the server sent the store for one request."""

    sent: Counter[str]  # message names, as the proxy read them
    round_trips: int
    operations: Counter[str]  # the store operations among them: claim, complete, renew, release
    server_calls: Counter[str] | None = None  # Redis only: commands the server counted
    server_reads: int | None = None  # Redis only: requests it read from clients

    @property
    def quiet(self) -> bool:
        """The server counted what went through the proxy, and nothing else."""
        return self.server_reads is None or self.server_reads == self.round_trips

    @classmethod
    def of(cls, kind: str, sent: Counter[str]) -> Cost:
        operations: Counter[str] = Counter()
        for name, count in sent.items():
            _, _, label = name.partition(" ")
            if label:
                operations[label] += count
        if kind == "postgres":
            trips = sent["Sync"] + sum(n for name, n in sent.items() if name.startswith("Query"))
        else:
            trips = sum(sent.values())
        return cls(sent, trips, operations)


class RedisCounters:
    """The Redis server's own counters, read with INFO on a connection of the test's own."""

    def __init__(self, url: str) -> None:
        self.admin = redis.asyncio.Redis.from_url(url)

    async def snapshot(self) -> tuple[Counter[str], int]:
        info: dict[str, Any] = await self.admin.info("stats", "commandstats")
        calls = Counter(
            {
                k.removeprefix("cmdstat_"): int(v["calls"])
                for k, v in info.items()
                if "cmdstat_" in k
            }
        )
        return calls, int(info["total_reads_processed"])


async def measure(
    kind: str, proxy: StoreProxy, counters: RedisCounters | None, request: Awaitable[Answer]
) -> tuple[Answer, Cost]:
    """Send one request; what it cost, from the proxy and (Redis) from the server."""
    before = proxy.sent()
    if counters is not None:
        calls0, reads0 = await counters.snapshot()
    answer = await request
    cost = Cost.of(kind, proxy.sent() - before)
    if counters is not None:
        calls1, reads1 = await counters.snapshot()
        calls = calls1 - calls0
        calls["info"] -= 1  # the first snapshot
        cost.server_calls = +calls
        cost.server_reads = reads1 - reads0 - 1  # the second snapshot's own request
    return answer, cost


async def least(
    kind: str,
    proxy: StoreProxy,
    counters: RedisCounters | None,
    request: Callable[[], Awaitable[Answer]],
) -> tuple[Answer, Cost]:
    """``measure`` a request (``request()`` makes it), measured again with a new one while the
    Redis server's counts show another client's traffic too (the last one taken if it always
    does)."""
    for _ in range(TRIES):
        answer, cost = await measure(kind, proxy, counters, request())
        if cost.quiet:
            break
    return answer, cost


def check(cost: Cost, kind: str, operations: dict[str, int]) -> None:
    assert cost.operations == Counter(operations), cost
    assert cost.round_trips == sum(operations.values()), cost
    if kind == "postgres":
        # One statement per round trip, and nothing but the store's own statements.
        assert cost.sent["Sync"] == cost.round_trips, cost
        parses = sum(n for name, n in cost.sent.items() if name.startswith("Parse"))
        assert parses == cost.round_trips, cost
    else:
        assert sum(cost.sent.values()) == cost.round_trips, cost
        assert cost.server_calls is not None
        assert cost.server_reads is not None
        if cost.quiet:
            assert cost.server_calls["evalsha"] == cost.round_trips, cost
        else:  # other clients' traffic too: the server's counts include ours
            assert cost.server_calls["evalsha"] >= cost.round_trips, cost
            assert cost.server_reads >= cost.round_trips, cost


async def test_a_new_key_costs_2_round_trips_a_replay_1_and_a_fast_request_no_renewal(
    shared_store: SharedStore, servers: Servers, proxy: StoreProxy
) -> None:
    server: Server = servers.start(
        "api",
        lease=LEASE,
        store=shared_store.url_via(proxy.port),
        store_options=shared_store.options,
    )
    counters = RedisCounters(shared_store.url) if shared_store.kind == "redis" else None
    kind = shared_store.kind
    keys: list[str] = []

    def fresh(delay: float) -> Callable[[], Awaitable[Answer]]:
        """Requests, each with a key never sent before."""

        def request() -> Awaitable[Answer]:
            keys.append(f"trips-{uuid.uuid4()}")
            return pay(server, keys[-1], body(delay))

        return request

    try:
        for _ in range(3):  # connections open, the table exists, the scripts are loaded
            assert (await fresh(0.0)()).status == 201

        answer, new = await least(kind, proxy, counters, fresh(FAST))
        assert answer.status == 201, answer
        assert not answer.replayed
        check(new, kind, {"claim": 1, "complete": 1})

        key = keys[-1]
        replay_answer, replay = await least(
            kind, proxy, counters, lambda: pay(server, key, body(FAST))
        )
        assert replay_answer.status == 201
        assert replay_answer.replayed
        assert replay_answer.body == answer.body
        check(replay, kind, {"claim": 1})

        # A request that runs long enough to renew its lease: one more, and it is counted.
        slow_answer, slow = await least(kind, proxy, counters, fresh(SLOW))
        assert slow_answer.status == 201
        assert not slow_answer.replayed
        check(slow, kind, {"claim": 1, "renew": 1, "complete": 1})
    finally:
        if counters is not None:
            await counters.admin.aclose()
    print(
        f"{kind}: new key {new.round_trips} round trips {dict(new.operations)}; replay "
        f"{replay.round_trips} {dict(replay.operations)}; a {FAST} s handler under a {LEASE} s "
        f"lease renews 0 times, a {SLOW} s one {slow.operations['renew']} "
        f"({slow.round_trips} round trips); wire messages of a new key: {dict(new.sent)}"
        + (
            ""
            if new.server_calls is None
            else f"; Redis counted {dict(new.server_calls)}, {new.server_reads} reads"
            + ("" if new.quiet else " (with other clients' traffic)")
        )
    )
