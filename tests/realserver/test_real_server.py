"""The engine through real servers: uvicorn on loopback, real sockets, real SIGKILL and SIGSTOP.

Every handler run is counted from the ledger the app appends to (see ``app.py``), so runs are
counted across processes, including processes that were killed. Waits for leases to expire are
real sleeps; nothing here asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import uuid
from collections import Counter

import pytest

from oncely import storage_key

from .client import (
    TENANT,
    Answer,
    ConnectionLost,
    assert_in_flight_problem,
    burst,
    check_burst,
    pay,
    sleep_past,
    wait_for,
)
from .conftest import Server, Servers

pytestmark = pytest.mark.slow

CONCURRENT = 500


def in_flight_leases(servers: Servers) -> dict[str, float]:
    return {r["key"]: r["lease_until"] for r in servers.records() if r["state"] == "in_flight"}


# 1 and 2: a burst of identical requests -------------------------------------------------------


async def test_500_identical_requests_run_a_slow_handler_once(servers: Servers) -> None:
    server = servers.start("single", lease=10.0, delay=1.0)
    key = f"burst-{uuid.uuid4()}"
    histories = await burst(server, key, CONCURRENT)
    check_burst(servers, key, histories, "1 process")


async def test_500_identical_requests_across_two_workers_run_it_once(servers: Servers) -> None:
    server = servers.start("pair", lease=10.0, delay=1.0, workers=2)
    key = f"burst-{uuid.uuid4()}"
    histories = await burst(server, key, CONCURRENT)
    check_burst(servers, key, histories, "2 workers")


# 3: SIGKILL mid-request ------------------------------------------------------------------------


async def test_a_key_whose_server_was_killed_runs_again_after_the_lease(
    servers: Servers,
) -> None:
    lease = 2.0
    doomed = servers.start("doomed", lease=lease, delay=30.0)
    key = f"crash-{uuid.uuid4()}"
    in_flight = asyncio.create_task(pay(doomed, key))
    await wait_for(lambda: len(servers.runs(key)) == 1, "the handler to start")
    doomed.kill()
    with pytest.raises(ConnectionLost):
        await in_flight
    (lease_until,) = in_flight_leases(servers).values()

    heir = servers.start("heir", lease=lease, delay=0.0)
    assert time.time() < lease_until - 0.1, "the new server started after the lease expired"
    early = await pay(heir, key)
    assert_in_flight_problem(early)
    assert len(servers.runs(key)) == 1  # nothing ran on the new server yet

    await sleep_past(lease_until)
    retried = await pay(heir, key)
    assert retried.status == 201, retried
    assert not retried.replayed
    runs = servers.runs(key)
    assert [run["server"] for run in runs] == ["doomed", "heir"]
    assert retried.json()["id"] == runs[1]["id"]
    assert retried.headers["location"] == f"/payments/{runs[1]['id']}"
    assert [end["server"] for end in servers.ends(key)] == ["heir"]

    again = await pay(heir, key)
    assert again.status == 201
    assert again.replayed
    assert again.body == retried.body
    assert again.headers["location"] == retried.headers["location"]
    assert len(servers.runs(key)) == 2

    (record,) = servers.records()
    assert record["state"] == "completed"
    assert record["attempt"] == 2


# 4: a zombie whose lease was taken over --------------------------------------------------------


def pause_outside_a_write(server: Server, servers: Servers) -> None:
    """SIGSTOP ``server`` at a moment it holds no SQLite write lock.

    A process paused inside a write transaction would block every other writer of the file until
    it resumed; that is a property of SQLite, not what this test is about.
    """
    for _ in range(100):
        server.signal_group(signal.SIGSTOP)
        try:
            with contextlib.closing(
                sqlite3.connect(servers.db, timeout=0.2, isolation_level=None)
            ) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            server.signal_group(signal.SIGCONT)
            time.sleep(0.01)
    pytest.fail("could not pause the server outside a write transaction")


async def test_a_zombie_whose_lease_was_taken_over_cannot_overwrite_the_result(
    servers: Servers,
) -> None:
    lease = 1.0
    zombie = servers.start("A", lease=lease, delay=3.0)
    rescuer = servers.start("B", lease=lease, delay=0.0)
    key = f"zombie-{uuid.uuid4()}"
    first = asyncio.create_task(pay(zombie, key))
    await wait_for(lambda: len(servers.runs(key)) == 1, "A's handler to start")
    pause_outside_a_write(zombie, servers)  # its handler and its lease renewal stop

    (lease_until,) = in_flight_leases(servers).values()
    await sleep_past(lease_until)
    taken = await pay(rescuer, key)
    assert taken.status == 201, taken
    assert not taken.replayed
    runs = servers.runs(key)
    assert [run["server"] for run in runs] == ["A", "B"]
    b_id = runs[1]["id"]
    assert taken.json()["id"] == b_id
    assert servers.ends(key)[0]["server"] == "B"

    zombie.signal_group(signal.SIGCONT)
    await wait_for(lambda: len(servers.ends(key)) == 2, "A's handler to finish", limit=20.0)
    a_id = runs[0]["id"]
    # A's complete is refused by the fencing token, and A cuts its own answer short rather than
    # hand its client a second, different "original": that client retries and gets B's answer.
    with pytest.raises(ConnectionLost, match="truncated"):
        await first
    retried = await pay(zombie, key)
    assert retried.status == 201
    assert retried.replayed
    assert retried.json()["id"] == b_id
    await wait_for(
        lambda: "was taken over while it ran" in zombie.log(),
        "A to log that its complete was refused",
    )

    for server in (zombie, rescuer, zombie, rescuer):
        repeat = await pay(server, key)
        assert repeat.status == 201
        assert repeat.replayed
        assert repeat.body == taken.body, repeat.body
        assert repeat.json()["id"] == b_id != a_id
        assert repeat.headers["location"] == f"/payments/{b_id}"
    assert len(servers.runs(key)) == 2

    (record,) = servers.records()
    assert record["state"] == "completed"
    assert record["attempt"] == 2
    assert b_id.encode() in record["response"]
    assert a_id.encode() not in record["response"]


# 5: a worker killed with many keys in flight ---------------------------------------------------


async def test_a_worker_killed_with_50_keys_in_flight_loses_none_of_them(
    servers: Servers,
) -> None:
    hold = servers.tmp_path / "hold"
    hold.touch()  # every handler waits while this file exists
    pool = servers.start("pool", lease=2.0, workers=2, hold=hold)
    keys = [f"many-{i}-{uuid.uuid4()}" for i in range(50)]
    first = [asyncio.create_task(pay(pool, key)) for key in keys]
    await wait_for(lambda: len(servers.runs()) == len(keys), "50 handlers to start")
    pids = Counter(run["pid"] for run in servers.runs())
    victim, _ = pids.most_common(1)[0]
    doomed = {run["key"] for run in servers.runs() if run["pid"] == victim}
    os.kill(victim, signal.SIGKILL)
    hold.unlink()  # the surviving worker's handlers finish

    results = await asyncio.gather(*first, return_exceptions=True)
    first_answers: dict[str, Answer] = {}
    for key, result in zip(keys, results, strict=True):
        if key in doomed:
            assert isinstance(result, ConnectionLost), result
        else:
            assert isinstance(result, Answer), result
            assert result.status == 201, result
            first_answers[key] = result

    await wait_for(
        lambda: f"Child process [{victim}] died" in pool.log() and pool.started_workers() >= 3,
        "the supervisor to restart the killed worker",
        limit=20.0,
    )
    leases = in_flight_leases(servers)
    assert set(leases) == {storage_key(TENANT, key) for key in doomed}
    if leases:
        await sleep_past(max(leases.values()))

    retried = await asyncio.gather(*(pay(pool, key) for key in keys))
    for key, answer in zip(keys, retried, strict=True):
        assert answer.status == 201, (key, answer)
        if key in doomed:
            assert not answer.replayed
        else:
            assert answer.replayed
            assert answer.body == first_answers[key].body

    for key in keys:
        runs = servers.runs(key)
        ends = servers.ends(key)
        assert len(runs) == (2 if key in doomed else 1), runs
        assert len(ends) == 1, ends
        assert ends[0]["id"] == runs[-1]["id"]
    lines = len(servers.ledger_lines())

    repeated = await asyncio.gather(*(pay(pool, key) for key in keys))
    for answer, done in zip(repeated, retried, strict=True):
        assert answer.status == 201
        assert answer.replayed
        assert answer.body == done.body
    assert len(servers.ledger_lines()) == lines  # no further runs

    assert {r["state"] for r in servers.records()} == {"completed"}
    print(
        f"workers {dict(pids)}: killed {victim} with {len(doomed)} of {len(keys)} keys in flight; "
        f"each of those ran twice, the other {len(keys) - len(doomed)} once"
    )
