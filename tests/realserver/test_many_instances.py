"""Many API instances, one store: 4 uvicorn processes sharing a PostgreSQL schema or a Redis prefix.

The instances are separate processes on separate ports with no load balancer in front: the
client spreads its requests over them itself, so duplicates of one key meet only in the store.
Handler runs are counted from the ledger every instance appends to (see ``app.py``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import pytest

from oncely import State, storage_key

from .client import (
    MAX_TRIES,
    TENANT,
    Answer,
    ConnectionLost,
    KeepAlive,
    assert_in_flight_problem,
    burst,
    check_burst,
)
from .conftest import Server, Servers, SharedStore

pytestmark = pytest.mark.slow

INSTANCES = 4
DUPLICATES = 1_000
# Distinct keys in the many-keys run: 4,000 in `make test`; ONCELY_MANY_KEYS=10000 for a longer run.
KEYS = int(os.environ.get("ONCELY_MANY_KEYS", "4000"))
COPIES = 3
IN_FLIGHT = 256  # keep-alive connections the client keeps busy at once, spread evenly
RUN_LIMIT = 300.0  # seconds: a hung run fails instead of blocking the suite
# Each instance's PostgreSQL pool: 4 instances x 5 leaves room for everyone else on a server
# with the default max_connections (100).
POSTGRES_POOL = {"min_size": 1, "max_size": 5}


def start_instances(
    servers: Servers, store: SharedStore, *, lease: float, delay: float
) -> list[Server]:
    options = dict(store.options)
    if store.kind == "postgres":
        options.update(POSTGRES_POOL)
    return servers.start_many(
        [f"api-{n}" for n in range(INSTANCES)],
        lease=lease,
        delay=delay,
        store=store.url,
        store_options=options,
    )


async def test_1000_duplicates_across_4_instances_run_the_handler_once(
    shared_store: SharedStore, servers: Servers
) -> None:
    instances = start_instances(servers, shared_store, lease=10.0, delay=0.5)
    key = f"dup-{uuid.uuid4()}"
    started = time.perf_counter()
    histories = await burst(instances, key, DUPLICATES)
    elapsed = time.perf_counter() - started
    check_burst(servers, key, histories, f"{shared_store.kind}, {INSTANCES} instances")
    (run,) = servers.runs(key)
    assert run["attempt"] == 1
    record = await shared_store.record(storage_key(TENANT, key))
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.attempt == 1
    assert record.response is not None
    assert run["id"].encode() in record.response.body
    print(f"{DUPLICATES} duplicates over {INSTANCES} instances answered in {elapsed:.1f} s")


async def send_all(
    instances: list[Server], keys: list[str]
) -> tuple[list[list[list[Answer]]], list[BaseException], float]:
    """Send every key COPIES times, copy ``c`` of key ``i`` to instance ``(i + c) % 4``.

    Each instance has a queue of (key, copy) in key order, worked through by IN_FLIGHT / 4
    keep-alive connections, so the copies of a key reach three instances at about the same
    moment. A copy told 409 goes back to its instance's queue after Retry-After, without holding
    a connection meanwhile. Returns every answer (per key, per copy, in order), the errors, and
    the seconds it all took.
    """
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[tuple[int, int] | None]] = [asyncio.Queue() for _ in instances]
    for i in range(len(keys)):
        for copy in range(COPIES):
            queues[(i + copy) % len(instances)].put_nowait((i, copy))
    answers: list[list[list[Answer]]] = [[[] for _ in range(COPIES)] for _ in keys]
    errors: list[BaseException] = []
    remaining = len(keys) * COPIES
    finished = asyncio.Event()

    async def worker(which: int) -> None:
        nonlocal remaining
        connection = KeepAlive(instances[which])
        queue = queues[which]
        try:
            while (item := await queue.get()) is not None:
                i, copy = item
                history = answers[i][copy]
                try:
                    answer = await connection.pay(keys[i])
                except ConnectionLost as exc:
                    errors.append(exc)
                else:
                    history.append(answer)
                    retry_after = answer.headers.get("retry-after")
                    if answer.status == 409 and retry_after and len(history) < MAX_TRIES:
                        loop.call_later(float(retry_after), queue.put_nowait, item)
                        continue
                remaining -= 1
                if remaining == 0:
                    finished.set()
        finally:
            await connection.close()

    started = time.perf_counter()
    workers = [asyncio.create_task(worker(n % len(instances))) for n in range(IN_FLIGHT)]
    try:
        async with asyncio.timeout(RUN_LIMIT):
            await finished.wait()
    finally:
        elapsed = time.perf_counter() - started
        for queue in queues:
            for _ in range(IN_FLIGHT):
                queue.put_nowait(None)
        await asyncio.gather(*workers)
    return answers, errors, elapsed


async def test_thousands_of_keys_sent_3_times_across_4_instances_run_once_each(
    shared_store: SharedStore, servers: Servers
) -> None:
    instances = start_instances(servers, shared_store, lease=10.0, delay=0.0)
    batch = uuid.uuid4().hex[:12]
    keys = [f"many-{batch}-{i}" for i in range(KEYS)]
    answers, errors, elapsed = await send_all(instances, keys)
    assert not errors, errors[:5]

    flat = [a for per_key in answers for history in per_key for a in history]
    statuses = Counter(a.status for a in flat)
    failures = [(a.status, a.body) for a in flat if a.status >= 500]
    assert not failures, (statuses, failures[:5])
    assert set(statuses) <= {201, 409}, statuses
    for answer in flat:
        if answer.status == 409:
            assert_in_flight_problem(answer)

    lines = servers.ledger_lines()
    starts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ends: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        (starts if line["event"] == "start" else ends)[line["key"]].append(line)
    assert sum(len(runs) for runs in starts.values()) == KEYS
    assert set(starts) == set(keys)

    replays = 0
    for key, per_key in zip(keys, answers, strict=True):
        finals = [history[-1] for history in per_key]
        assert all(a.status == 201 for a in finals), (key, per_key)
        originals = [
            a for history in per_key for a in history if not a.replayed and a.status == 201
        ]
        assert len(originals) == 1, (key, per_key)
        assert {a.body for a in finals} == {originals[0].body}, (key, per_key)
        (run,) = starts[key]
        assert run["attempt"] == 1
        assert [end["id"] for end in ends[key]] == [run["id"]]
        assert originals[0].json()["id"] == run["id"]
        replays += sum(a.replayed for a in finals)

    first = Counter(
        "original" if not a.replayed and a.status == 201 else "replay" if a.replayed else "409"
        for per_key in answers
        for a in (history[0] for history in per_key)
    )
    by_server = Counter(run[0]["server"] for run in starts.values())
    print(
        f"{shared_store.kind}: {KEYS} keys x {COPIES} over {INSTANCES} instances, "
        f"{IN_FLIGHT} connections: {len(flat)} requests in {elapsed:.1f} s "
        f"({len(flat) / elapsed:.0f} requests/s, {KEYS * COPIES / elapsed:.0f} copies/s); "
        f"answers {dict(statuses)}; first answers {dict(first)}; {replays} replays; "
        f"runs by instance {dict(sorted(by_server.items()))}"
    )
