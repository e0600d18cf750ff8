"""Store outages, with a real uvicorn server and a proxy the test controls in front of the store.

The server reaches PostgreSQL or Redis only through :class:`StoreProxy`, with short timeouts on
every store call (``STORE_TIMEOUT`` in the middleware, and the drivers' own connect, pool and
socket timeouts: see ``STORE_OPTIONS``). The proxy refuses connections, cuts them (before a claim
or a completion reaches the store, or after the store did it but before its answer is back), or
hangs. What must hold, from the answers and from the ledger of handler runs:

- while the store cannot be used, every keyed request is answered 503 with Retry-After as
  problem+json, within about the store timeout, and the handler does not run;
- the handler never runs without a claim (each ledger line carries the attempt number) and
  never twice for a key while the store answers;
- once the proxy passes traffic again, the same server recovers by itself, and the requests that
  were refused run once when retried.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from oncely import State, storage_key
from oncely.stores import _redis_lua as redis_store

from .client import (
    MAX_TRIES,
    TENANT,
    Answer,
    assert_in_flight_problem,
    assert_unavailable_problem,
    pay,
)
from .conftest import Server, Servers, SharedStore, sha1_of
from .proxy import Mode, StoreProxy

pytestmark = pytest.mark.slow

LEASE = 3.0
STORE_TIMEOUT = 1.0
# One configuration of every store timeout: the middleware's store_timeout bounds each store
# call; these bound the drivers' own waits (seconds).
STORE_OPTIONS: dict[str, dict[str, Any]] = {
    "postgres": {"connect_timeout": 1, "pool_timeout": 1, "min_size": 1, "max_size": 4},
    "redis": {"socket_timeout": 1, "socket_connect_timeout": 1},
}
OUTAGE_KEYS = 20
OUTAGE = 5.0  # seconds the store stays out (refused or hung) while clients keep retrying
RECOVERY_LIMIT = 30.0  # seconds the server may take to answer 201 again once traffic passes
# Each 503 must come within the store timeout, plus this much for everything else.
SLACK = 1.0


CLAIM = {"postgres": b"INSERT INTO", "redis": sha1_of(redis_store.CLAIM)}
COMPLETE = {
    "postgres": b"SET response = CASE WHEN state = 'in_flight'",
    "redis": sha1_of(redis_store.COMPLETE),
}


def start_api(servers: Servers, store: SharedStore, proxy: StoreProxy, name: str = "api") -> Server:
    return servers.start(
        name,
        lease=LEASE,
        store=store.url_via(proxy.port),
        store_options={**store.options, **STORE_OPTIONS[store.kind]},
        store_timeout=STORE_TIMEOUT,
    )


def new_key(label: str) -> str:
    return f"{label}-{uuid.uuid4()}"


async def warm_up(server: Server) -> None:
    """A few requests through a healthy store: connections open, table and scripts ready."""
    for _ in range(3):
        answer = await pay(server, new_key("warm"))
        assert answer.status == 201, answer


async def until_done(server: Server, key: str) -> list[Answer]:
    """Send ``key`` until it is answered 201, waiting Retry-After after each 409 or 503."""
    history: list[Answer] = []
    for _ in range(MAX_TRIES):
        answer = await pay(server, key)
        history.append(answer)
        if answer.status == 201:
            return history
        if answer.status == 409:
            assert_in_flight_problem(answer)
        else:
            assert_unavailable_problem(answer)
        await asyncio.sleep(float(answer.headers["retry-after"]))
    pytest.fail(f"{key} was not answered 201 in {MAX_TRIES} tries: {history}")


def assert_ran_once_each(servers: Servers, keys: list[str], finals: list[Answer]) -> None:
    """Each key ran exactly once, under a claim, and its final answer is that run's."""
    for key, final in zip(keys, finals, strict=True):
        runs = servers.runs(key)
        assert len(runs) == 1, (key, runs)
        assert runs[0]["attempt"] is not None, runs
        assert final.json()["id"] == runs[0]["id"]


async def assert_replays(server: Server, keys: list[str], finals: list[Answer]) -> None:
    for key, final in zip(keys, finals, strict=True):
        again = await pay(server, key)
        assert again.status == 201, again
        assert again.replayed
        assert again.body == final.body


def assert_every_run_had_a_claim(servers: Servers) -> None:
    lines = servers.ledger_lines()
    assert lines
    assert all(line["attempt"] is not None for line in lines), lines


# Refused, and hung -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.REFUSE, Mode.HANG])
async def test_a_store_that_refuses_or_hangs_answers_503_then_recovers_by_itself(
    mode: Mode, shared_store: SharedStore, servers: Servers, proxy: StoreProxy
) -> None:
    server = start_api(servers, shared_store, proxy)
    await warm_up(server)

    proxy.set_mode(mode)
    out = time.perf_counter()
    keys = [new_key(mode.value) for _ in range(OUTAGE_KEYS)]
    refused: list[Answer] = []
    waves = 0
    # The clients retry, every key at once, while the store stays out.
    while waves < 2 or time.perf_counter() - out < OUTAGE:
        answers = await asyncio.gather(*(pay(server, key) for key in keys))
        for answer in answers:
            assert_unavailable_problem(answer)
            assert answer.latency < STORE_TIMEOUT + SLACK, answer.latency
        refused.extend(answers)
        waves += 1
        await asyncio.sleep(0.2)
    slowest = max(a.latency for a in refused)
    # Nothing ran without the store.
    assert all(servers.runs(key) == [] for key in keys)
    assert server.proc.poll() is None

    proxy.set_mode(Mode.PASS)
    back = time.perf_counter()
    unavailable_after = 0
    while True:
        probe = await pay(server, new_key("probe"))
        if probe.status == 201:
            break
        assert_unavailable_problem(probe)
        unavailable_after += 1
        assert time.perf_counter() - back < RECOVERY_LIMIT, "the server did not recover"
        await asyncio.sleep(0.1)
    recovery = time.perf_counter() - back

    finals = []
    retries: Counter[int] = Counter()
    for key in keys:
        history = await until_done(server, key)
        finals.append(history[-1])
        retries.update(a.status for a in history)
    assert_ran_once_each(servers, keys, finals)
    await assert_replays(server, keys, finals)
    assert_every_run_had_a_claim(servers)
    # A claim held up in the network reaches the store after its client was answered 503: that
    # key is in flight until the lease ends, then runs (attempt 2).
    attempts = Counter(servers.runs(key)[0]["attempt"] for key in keys)
    print(
        f"{shared_store.kind} {mode.value}: {len(refused)} answers 503 during the outage "
        f"({waves} waves of {len(keys)} concurrent requests, the slowest in {slowest:.2f} s); "
        f"recovered {recovery:.2f} s after traffic passed again ({unavailable_after} more 503 "
        f"first); the {len(keys)} refused keys then ran once each (answers {dict(retries)}, "
        f"runs by attempt {dict(attempts)})"
    )


# Every live connection cut --------------------------------------------------------------------


async def test_cut_connections_cost_at_most_one_503_each_and_the_server_goes_on(
    shared_store: SharedStore, servers: Servers, proxy: StoreProxy
) -> None:
    """The store restarts, say: every open connection is reset, and the server is back at once.
    A request may pick a connection that is dead already (503); it is dropped, not reused."""
    server = start_api(servers, shared_store, proxy)
    fill = await asyncio.gather(*(pay(server, new_key("fill")) for _ in range(8)))
    assert all(a.status == 201 for a in fill), fill  # several connections open now
    cut = proxy.cut()
    assert cut >= 1

    keys = [new_key("after-cut") for _ in range(cut + 4)]
    first = [await pay(server, key) for key in keys]  # one at a time: each takes a connection
    unavailable = [key for key, a in zip(keys, first, strict=True) if a.status != 201]
    for key, answer in zip(keys, first, strict=True):
        if answer.status != 201:
            assert_unavailable_problem(answer)
            assert servers.runs(key) == []
    assert len(unavailable) <= cut
    assert first[-1].status == 201

    finals = [
        a if a.status == 201 else (await until_done(server, k))[-1]
        for k, a in zip(keys, first, strict=True)
    ]
    assert_ran_once_each(servers, keys, finals)
    await assert_replays(server, keys, finals)
    assert_every_run_had_a_claim(servers)
    print(
        f"{shared_store.kind}: cut {cut} live connections; {len(unavailable)} of the next "
        f"{len(keys)} requests answered 503, then the server went on"
    )


# Cut mid-claim and mid-complete ------------------------------------------------------------------


@pytest.mark.parametrize("forward", [False, True], ids=["lost", "unanswered"])
async def test_a_claim_cut_off_runs_the_key_once(
    forward: bool, shared_store: SharedStore, servers: Servers, proxy: StoreProxy
) -> None:
    """``lost``: the claim never reached the store. ``unanswered``: the store took the claim,
    and its answer was lost with the connection.

    PostgreSQL claims once more on a fresh connection with the same token, so the request goes
    on (a claim that had landed is recognised as its own). Redis answers 503; a claim that had
    landed keeps the key in flight until its lease ends, then a retry takes it over.
    """
    server = start_api(servers, shared_store, proxy)
    await warm_up(server)
    key = new_key("claim-cut")
    skey = storage_key(TENANT, key)

    trap = proxy.trap(CLAIM[shared_store.kind], forward=forward)
    first = await pay(server, key)
    assert trap.sprung.is_set()
    assert trap.answered is forward
    other = await pay(server, new_key("after-cut"))  # the server goes on at once, no restart
    assert other.status == 201, other

    if shared_store.kind == "postgres":
        assert first.status == 201, first
        assert not first.replayed
        (run,) = servers.runs(key)
        assert run["attempt"] == 1
        assert first.json()["id"] == run["id"]
        await assert_replays(server, [key], [first])
        assert_every_run_had_a_claim(servers)
        return

    assert_unavailable_problem(first)
    assert servers.runs(key) == []
    record = await shared_store.record(skey)
    if forward:
        assert record is not None
        assert record.state is State.IN_FLIGHT
        assert record.attempt == 1
    else:
        assert record is None

    history = await until_done(server, key)
    (run,) = servers.runs(key)
    assert history[-1].json()["id"] == run["id"]
    assert not history[-1].replayed
    if forward:
        assert record is not None
        # The claim stands: the key is in flight until its lease ends, then taken over.
        assert all(a.status == 409 for a in history[:-1]), history
        assert run["attempt"] == 2
        assert run["at"] >= record.lease_until - 0.05
    else:
        assert len(history) == 1
        assert run["attempt"] == 1
    await assert_replays(server, [key], [history[-1]])
    assert_every_run_had_a_claim(servers)
    print(f"{shared_store.kind}, claim {'unanswered' if forward else 'lost'}: {len(history)} tries")


@pytest.mark.parametrize("forward", [False, True], ids=["lost", "unanswered"])
async def test_a_completion_cut_off_is_retried_and_the_key_never_runs_twice(
    forward: bool, shared_store: SharedStore, servers: Servers, proxy: StoreProxy
) -> None:
    """``lost``: the completion never reached the store. ``unanswered``: the store stored the
    response, and its answer was lost with the connection. Either way the middleware completes
    again (fenced by the token, idempotent for it): the response is stored, and kept."""
    server = start_api(servers, shared_store, proxy)
    await warm_up(server)
    key = new_key("complete-cut")
    skey = storage_key(TENANT, key)

    trap = proxy.trap(COMPLETE[shared_store.kind], forward=forward)
    first = await pay(server, key)
    assert trap.sprung.is_set()
    assert trap.answered is forward
    # The handler ran and answered: its client has that answer.
    assert first.status == 201, first
    assert not first.replayed
    (run,) = servers.runs(key)
    assert first.json()["id"] == run["id"]

    record = await shared_store.record(skey)
    assert record is not None
    assert record.state is State.COMPLETED
    history = await until_done(server, key)
    final = history[-1]
    runs = servers.runs(key)
    # The response is stored: every repeat is its replay, and nothing runs again.
    assert len(history) == 1
    assert final.replayed
    assert final.body == first.body
    assert len(runs) == 1
    stored = await shared_store.record(skey)
    assert stored is not None
    assert stored.state is State.COMPLETED
    assert stored.response is not None
    assert stored.response.body == final.body
    await assert_replays(server, [key, key], [final, final])
    assert_every_run_had_a_claim(servers)
    print(
        f"{shared_store.kind}, completion {'unanswered' if forward else 'lost'}: record was "
        f"{record.state.value}; {len(runs)} run(s); {len(history)} tries after"
    )
