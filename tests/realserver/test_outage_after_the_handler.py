"""A store outage shorter than the lease, as the handler finishes, never runs a payment twice.

Real uvicorn (uvloop and httptools, as ``uvicorn[standard]`` runs), a handler that takes 1 s, a
10 s lease. 0.5 s after the payment is sent the store goes away (PostgreSQL and Redis through a
proxy that refuses or hangs; SQLite held by another connection's write lock) for 1, 3 or 8 s, so
the handler finishes while the outcome cannot be written. The key is the request's for its
whole lease: the middleware keeps trying the write while it holds the lease and answers the
client meanwhile. The client retries all along, as clients do. What must hold:

- the first client gets its whole answer (201), at most about ``store_timeout`` after the
  handler finished;
- its retries are told 409 (in flight) or 503 (store unavailable) until the write lands, then
  get that answer replayed, byte for byte;
- the handler ran exactly once, under a claim.

An outage longer than the lease is the limit: the outcome is abandoned when the lease ends
(``tests/test_store_blips.py``), and only atomic phases in the business transaction still run
the effect once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from .client import Answer, assert_in_flight_problem, assert_unavailable_problem, pay
from .conftest import Server, Servers, SharedStore
from .proxy import Mode, StoreProxy
from .test_store_outage import STORE_OPTIONS

pytestmark = pytest.mark.slow

LEASE = 10.0
HANDLER = 1.0  # seconds the handler takes
OUT_AFTER = 0.5  # seconds after the request is sent that the store goes away
STORE_TIMEOUT = 1.0
OUTAGES = [1.0, 3.0, 8.0]
SLACK = 1.5  # seconds beyond the handler and store_timeout for the first answer
BODY = json.dumps({"amount": 1250, "currency": "EUR", "delay": HANDLER}).encode()


async def retry_until_replayed(server: Server, key: str, limit: float) -> list[Answer]:
    """Retry ``key`` every 0.3 s, as a client does, until its answer is a replay."""
    history: list[Answer] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        answer = await pay(server, key, BODY)
        history.append(answer)
        if answer.status == 201:
            assert answer.replayed, f"a second run answered {key}: {history}"
            return history
        if answer.status == 409:
            assert_in_flight_problem(answer)
        else:
            assert_unavailable_problem(answer)
        await asyncio.sleep(0.3)
    pytest.fail(f"{key} was not replayed within {limit} s: {[a.status for a in history]}")


async def pay_through_an_outage(
    server: Server, servers: Servers, outage: float, *, out: object, back: object
) -> str:
    """Send one payment, take the store away (``out()``) 0.5 s later for ``outage`` seconds
    (``back()``), retrying all along; check the answers and the single run. A summary line."""
    key = f"outage-{uuid.uuid4()}"
    sent = time.monotonic()
    first_task = asyncio.ensure_future(pay(server, key, BODY))
    await asyncio.sleep(OUT_AFTER)
    await asyncio.to_thread(out)  # type: ignore[arg-type]
    gone = time.monotonic()

    async def restore() -> None:
        await asyncio.sleep(max(0.0, gone + outage - time.monotonic()))
        await asyncio.to_thread(back)  # type: ignore[arg-type]

    restoring = asyncio.ensure_future(restore())
    first = await first_task
    answered = time.monotonic() - sent
    history = await retry_until_replayed(server, key, limit=LEASE + 20)
    await restoring

    assert first.status == 201, first
    assert not first.replayed
    assert answered < HANDLER + STORE_TIMEOUT + SLACK, answered
    replay = history[-1]
    assert replay.body == first.body
    runs = servers.runs(key)
    assert len(runs) == 1, runs
    assert runs[0]["attempt"] == 1
    assert first.json()["id"] == runs[0]["id"]
    statuses = Counter(a.status for a in history[:-1])
    return (
        f"{outage:g} s out: first answer in {answered:.2f} s, {sum(statuses.values())} retries "
        f"answered {dict(statuses)} before the replay, 1 run"
    )


@pytest.mark.parametrize("mode", [Mode.REFUSE, Mode.HANG], ids=["refused", "hung"])
async def test_an_outage_shorter_than_the_lease_as_the_handler_finishes_runs_it_once(
    mode: Mode, shared_store: SharedStore, servers: Servers, proxy: StoreProxy
) -> None:
    server = servers.start(
        "api",
        lease=LEASE,
        store=shared_store.url_via(proxy.port),
        store_options={**shared_store.options, **STORE_OPTIONS[shared_store.kind]},
        store_timeout=STORE_TIMEOUT,
    )
    for _ in range(3):  # connections open, table and scripts ready
        assert (await pay(server, f"warm-{uuid.uuid4()}")).status == 201
    lines = []
    for outage in OUTAGES:
        lines.append(
            await pay_through_an_outage(
                server,
                servers,
                outage,
                out=lambda: proxy.set_mode(mode),
                back=lambda: proxy.set_mode(Mode.PASS),
            )
        )
    print(f"{shared_store.kind} {mode.name.lower()}: " + "; ".join(lines))


class WriteLock:
    """Another connection's write transaction on the SQLite file: every writer waits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread: threading.Thread | None = None

    def _hold(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._held.set()
            self._release.wait(60)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def take(self) -> None:
        self._release.clear()
        self._held.clear()
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()
        assert self._held.wait(10), "could not take the write lock"

    def give_back(self) -> None:
        self._release.set()
        assert self._thread is not None
        self._thread.join(10)


async def test_sqlite_locked_as_the_handler_finishes_runs_it_once(servers: Servers) -> None:
    """SQLite's outage is a writer that holds the file (a long transaction elsewhere, a backup):
    every write waits busy_timeout (1 s here) and fails; reads still answer."""
    server = servers.start(
        "api", lease=LEASE, store_options={"busy_timeout": 1.0}, store_timeout=STORE_TIMEOUT
    )
    for _ in range(3):
        assert (await pay(server, f"warm-{uuid.uuid4()}")).status == 201
    lock = WriteLock(servers.db)
    lines = [
        await pay_through_an_outage(server, servers, outage, out=lock.take, back=lock.give_back)
        for outage in OUTAGES
    ]
    print("sqlite locked: " + "; ".join(lines))
