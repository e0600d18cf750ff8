"""The nemesis: the payments service as several processes on one store, attacked, then audited.

    python -m oncely_payments.nemesis [--store sqlite|postgresql|redis|URL ...]
        [--duration SECONDS] [--processes N] [--seed N] [--json PATH] [--plant-duplicate]

For each store, ``--processes`` service processes share one store: a SQLite file, a PostgreSQL
schema of the run's own, or a Redis key prefix of the run's own (``nemesis-<random>:``, its keys
deleted at the end) with the ledger apart from it in a SQLite file (the service's
``--database``). Each process reaches PostgreSQL or Redis through a TCP proxy of its own
(``store_proxy.StoreProxy``). A fleet of clients, each an ``httpx.AsyncClient`` over oncely's
``AsyncIdempotentTransport``, pays intents (one customer and one Idempotency-Key each) against a
random live process, retrying until a final answer (201, or 402 for a declined card).

For ``--duration`` seconds the nemesis, at random moments, does one of (in rounds: every kind
once a round, shuffled, process and store faults alternating):

- ``kill``: SIGKILL a service process (its whole group), restart it on a new port;
- ``pause``: SIGSTOP a process past its lease, then SIGCONT: a retry takes its keys over, and
  the paused process wakes up as a stale lease holder that fencing must stop;
- ``store-cut``: reset every live connection of a process to the store;
- ``store-delay``: hold a process's store traffic (sent, not delivered) for up to 1.5 s;
- ``store-reset``: refuse and reset a process's store connections for up to 1 s;

and the clients' transport sends copies of requests (``duplicate``), some of them late, after
later retries of the same key (``reorder``). SQLite has no connection to cut: its runs get the
process faults only.

Then the audit (audit.py) of the ledger and the card network: duplicates, lost payments, wrong
ones, clients told another payment than the one kept; and of the store: keys still in flight
past their lease (for Redis read with the store's own ``stats``). When the first look finds
some (on Redis: answered while the response's write went on, and that write never landed),
every intent is retried once more, and the store read again. The report ends with one audit
line per store. Exit status 0 when all are clean, 1 on any violation, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from oncely.client import AsyncIdempotentTransport, RetryEvent, RetryPolicy

from .audit import ApiLedger, AuditReport, Intent, Kind, Outcome, audit, card_network_charges
from .chaos import LOOPBACK, ServiceProcess
from .demo import _positive
from .store_proxy import Mode, StoreProxy

__all__ = ["NemesisConfig", "StoreRun", "main", "parse_args", "run_store"]

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
STORES = {"sqlite": "sqlite", "postgresql": POSTGRES_URL, "redis": REDIS_URL}
STUCK_LIMIT = 100_000  # in-flight keys the Redis audit lists (the oldest leases first)
UNFENCED_ENV = "ONCELY_PAYMENTS_UNFENCED"
FINAL = (201, 402)


@dataclass(frozen=True)
class NemesisConfig:
    stores: tuple[str, ...] = ("sqlite", "postgresql", "redis")
    duration: float = 85.0  # seconds of faults per store: about 5 minutes for the three
    processes: int = 3
    clients: int = 12
    seed: int | None = None
    json_path: Path | None = None
    lease: float = 2.0
    card_latency_ms: float = 20.0
    fault_gap: tuple[float, float] = (0.3, 1.2)  # seconds between two faults
    duplicate_rate: float = 0.05  # of requests: a copy sent at once
    reorder_rate: float = 0.05  # of requests: a copy sent late, after later retries
    reorder_delay: tuple[float, float] = (0.5, 3.0)  # seconds a late copy waits
    intent_deadline: float = 90.0
    unfenced: bool = False  # tests only: the service's store ignores fencing tokens
    plant_duplicate: bool = False  # tests only: a second payment for one intent before the audit
    # Tests only (Redis): one completed record turned back into what a final write that never
    # landed leaves (in flight, its lease over, no response), before the audit.
    plant_unrecorded: bool = False


@dataclass
class StoreRun:
    """One store's run: what was done to it, and what the audit found."""

    store: str
    seed: int
    processes: int
    duration: float = 0.0
    intents: int = 0
    requests: int = 0
    retries: int = 0
    replays: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    payments: int = 0
    stuck: list[str] = field(default_factory=list)  # keys in flight past their lease
    namespace: str | None = None  # the run's PostgreSQL schema or Redis key prefix (removed)
    # Keys in flight past their lease at the first look, each intent then retried once more
    # (the last retry) before the store is read again: answered, but their outcome not stored.
    unrecorded: list[str] = field(default_factory=list)
    report: AuditReport = field(default_factory=AuditReport)
    error: str | None = None

    @property
    def violations(self) -> dict[str, int]:
        r = self.report
        return {
            "duplicates": len(r.duplicates),
            "lost": len(r.lost),
            "stuck": len(self.stuck),
            "inconsistent": len(r.inconsistent) + len(r.wrong),
            "other": len(r.answers) + len(r.strays) + len(r.charged),
        }

    @property
    def ok(self) -> bool:
        return self.error is None and not any(self.violations.values())

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "store": self.store,
            "seed": self.seed,
            "processes": self.processes,
            "namespace": self.namespace,
            "seconds": round(self.duration, 1),
            "intents": self.intents,
            "requests": self.requests,
            "retries": self.retries,
            "replays": self.replays,
            "faults": dict(sorted(self.faults.items())),
            "audit": {
                **self.violations,
                "payments": r.payments,
                "charges": r.charges,
                "unrecorded": len(self.unrecorded),
                "problems": [*r.problems, *self.stuck][:50],
            },
            "error": self.error,
            "ok": self.ok,
        }

    def line(self) -> str:
        v = self.violations
        faults = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.store}: audit duplicates {v['duplicates']} lost {v['lost']} stuck "
            f"{v['stuck']} inconsistent {v['inconsistent']} other {v['other']} - {verdict}; "
            f"{self.intents} payments, {self.requests} requests, {self.retries} retries, "
            f"{self.replays} replays in {self.duration:.0f} s; faults: {faults}"
            + (
                f"; {len(self.unrecorded)} answered but left in flight, taken over by the last "
                "retry"
                if self.unrecorded
                else ""
            )
            + (f"; error: {self.error}" if self.error else "")
        )


# ---------------------------------------------------------------------------------------------
# The fleet


class Fleet:
    """The service processes, each behind its own store proxy (None for SQLite)."""

    def __init__(self, services: list[ServiceProcess], proxies: list[StoreProxy | None]) -> None:
        self.services, self.proxies = services, proxies
        self.paused: set[int] = set()
        self.down: set[int] = set()

    def live_url(self, rng: random.Random) -> str:
        up = [i for i in range(len(self.services)) if i not in self.down] or [0]
        return self.services[rng.choice(up)].url


class DuplicatingTransport(httpx.AsyncBaseTransport):
    """The network under the client's retries: sends copies of requests, some late."""

    def __init__(self, cfg: NemesisConfig, run: StoreRun, rng: random.Random, fleet: Fleet):
        self.cfg, self.run, self.rng, self.fleet = cfg, run, rng, fleet
        self.inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
        )
        self.outcomes: dict[str, tuple[Intent, Outcome]] = {}
        self.copies: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.run.requests += 1
        body = await request.aread()
        draw = self.rng.random()
        if draw < self.cfg.duplicate_rate:
            self._copy(request, body, 0.0, "duplicate")
        elif draw < self.cfg.duplicate_rate + self.cfg.reorder_rate:
            self._copy(request, body, self.rng.uniform(*self.cfg.reorder_delay), "reorder")
        response = await self.inner.handle_async_request(request)
        if response.headers.get("idempotent-replayed") == "true":
            self.run.replays += 1
        return response

    def _copy(self, request: httpx.Request, body: bytes, delay: float, kind: str) -> None:
        self.run.faults[kind] += 1
        task = asyncio.create_task(self._send_copy(request, body, delay))
        self.copies.add(task)
        task.add_done_callback(self.copies.discard)

    async def _send_copy(self, request: httpx.Request, body: bytes, delay: float) -> None:
        await asyncio.sleep(delay)
        # To any live process: the copy need not meet the original's process.
        url = httpx.URL(self.fleet.live_url(self.rng)).join(request.url.raw_path.decode())
        copy = httpx.Request(request.method, url, headers=request.headers, content=body)
        self.run.requests += 1
        try:
            async with httpx.AsyncClient(transport=self.inner, timeout=10.0) as client:
                response = await client.send(copy)
        except httpx.HTTPError:
            return
        found = self.outcomes.get(request.headers.get("idempotency-key", ""))
        if found is not None and response.status_code in FINAL:
            record_final(*found, response)

    async def aclose(self) -> None:
        for task in list(self.copies):
            task.cancel()
        await asyncio.gather(*self.copies, return_exceptions=True)
        await self.inner.aclose()


def record_final(intent: Intent, outcome: Outcome, response: httpx.Response) -> None:
    """A final answer (201 or 402): the payment it names, checked against the intent."""
    where = f"intent {intent.number} ({intent.customer})"
    try:
        body = response.json()
    except ValueError:
        body = None
    payment = body.get("payment") if response.status_code == 402 and body else body
    payment_id = payment.get("id") if isinstance(payment, dict) else None
    if not isinstance(payment_id, str):
        outcome.problems.append(f"{where}: {response.status_code} without a payment: {body!r}")
        return
    outcome.ids_seen.add(payment_id)
    if outcome.status is None:
        outcome.status, outcome.payment_id = response.status_code, payment_id


class Clients:
    def __init__(self, cfg: NemesisConfig, run: StoreRun, rng: random.Random, fleet: Fleet):
        self.cfg, self.run, self.rng, self.fleet = cfg, run, rng, fleet
        self.network = DuplicatingTransport(cfg, run, random.Random(rng.random()), fleet)
        self.intents: list[Intent] = []
        self.outcomes: dict[int, Outcome] = {}
        self.run_id = secrets.token_hex(4)

    def on_retry(self, event: RetryEvent) -> None:
        self.run.retries += 1

    def new_intent(self) -> Intent:
        n = len(self.intents)
        draw = self.rng.random()
        kind, prefix = (Kind.NORMAL, "cus")
        if draw < 0.1:
            kind, prefix = Kind.DECLINE, "cus_decline"
        elif draw < 0.2:
            kind, prefix = Kind.FLAKY, "cus_flaky"
        intent = Intent(
            number=n,
            tenant=f"sk_nemesis_{self.run_id}_{n % 3}",
            key=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            customer=f"{prefix}_{self.run_id}_{n}",
            amount=self.rng.randint(100, 100_000),
            kind=kind,
        )
        self.intents.append(intent)
        outcome = self.outcomes[n] = Outcome()
        self.network.outcomes[intent.key] = (intent, outcome)
        return intent

    async def run_all(self, stop: asyncio.Event) -> None:
        policy = RetryPolicy(attempts=6, base=0.05, cap=1.0, deadline=15.0, retry_after_max=5.0)
        transport = AsyncIdempotentTransport(
            self.network, policy=policy, budget=None, on_retry=self.on_retry
        )
        async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:

            async def worker() -> None:
                while not stop.is_set():
                    await self.pay(client, self.new_intent())

            await asyncio.gather(*(worker() for _ in range(self.cfg.clients)))
            # Late copies still on their way are part of what the clients were told.
            await asyncio.gather(*self.network.copies, return_exceptions=True)
        await self.network.aclose()

    async def pay(self, client: httpx.AsyncClient, intent: Intent) -> None:
        outcome = self.outcomes[intent.number]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.intent_deadline
        while outcome.status is None and loop.time() < deadline:
            url = self.fleet.live_url(self.rng) + "/payments"
            outcome.requests += 1
            try:
                response = await client.post(url, content=intent.body(), headers=intent.headers())
            except httpx.HTTPError:
                self.run.retries += 1
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                continue
            if response.status_code in FINAL:
                record_final(intent, outcome, response)
            elif response.status_code not in (409, 503):
                outcome.problems.append(
                    f"intent {intent.number}: unexpected {response.status_code}: "
                    f"{response.text[:200]}"
                )
                return
            else:
                self.run.retries += 1
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        if outcome.status is None:
            outcome.problems.append(f"intent {intent.number}: no final answer in time")


# ---------------------------------------------------------------------------------------------
# The nemesis


def _signal(service: ServiceProcess, sig: signal.Signals) -> None:
    if service.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.proc.pid, sig)


async def nemesis(
    cfg: NemesisConfig, run: StoreRun, rng: random.Random, fleet: Fleet, stop: asyncio.Event
) -> None:
    process_kinds = ["kill", "pause"]
    store_kinds = ["store-cut", "store-delay", "store-reset"]
    if not any(p is not None for p in fleet.proxies):
        store_kinds = []

    def new_round() -> list[str]:
        """Every kind once, in a shuffled order, process and store faults alternating (so that
        even a short run gets both): popped from the end."""
        ps, ss = rng.sample(process_kinds, 2), rng.sample(store_kinds, len(store_kinds))
        order = [k for pair in itertools.zip_longest(ps, ss) for k in pair if k is not None]
        return order[::-1]

    busy: set[int] = set()
    jobs: set[asyncio.Task[None]] = set()
    round_left: list[str] = []

    async def strike(kind: str, i: int) -> None:
        service, proxy = fleet.services[i], fleet.proxies[i]
        try:
            if kind == "kill":
                fleet.down.add(i)
                await service.kill()
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                await service.start()
                fleet.down.discard(i)
            elif kind == "pause":
                _signal(service, signal.SIGSTOP)
                await asyncio.sleep(cfg.lease * rng.uniform(1.5, 2.5))
                _signal(service, signal.SIGCONT)
            elif proxy is not None and kind == "store-cut":
                await asyncio.to_thread(proxy.cut)
            elif proxy is not None:
                mode = Mode.HANG if kind == "store-delay" else Mode.REFUSE
                await asyncio.to_thread(proxy.set_mode, mode)
                await asyncio.sleep(rng.uniform(0.1, 1.5 if mode is Mode.HANG else 1.0))
                await asyncio.to_thread(proxy.set_mode, Mode.PASS)
        finally:
            busy.discard(i)

    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(*cfg.fault_gap))
            if stop.is_set():
                break
            # Always one process untouched, so that the clients can make progress.
            free = [i for i in range(len(fleet.services)) if i not in busy]
            if not free or (len(free) <= 1 and len(fleet.services) > 1):
                continue
            i = rng.choice(free)
            if not round_left:
                round_left = new_round()
            kind = round_left.pop()
            busy.add(i)
            run.faults[kind] += 1
            job = asyncio.create_task(strike(kind, i))
            jobs.add(job)
            job.add_done_callback(jobs.discard)
            for done in [j for j in jobs if j.done()]:
                done.result()
    finally:
        await asyncio.gather(*jobs)


# ---------------------------------------------------------------------------------------------
# The store's audit and the planted duplicate


async def last_retry(clients: Clients, url: str, *, concurrency: int = 12) -> None:
    """Every intent once more, straight to one process, no fault: a key left in flight past its
    lease is taken over, and its answer, like every other, must name the payment kept."""
    gate = asyncio.Semaphore(concurrency)

    async def once(client: httpx.AsyncClient, intent: Intent) -> None:
        outcome = clients.outcomes[intent.number]
        async with gate:
            try:
                response = await client.post(
                    "/payments", content=intent.body(), headers=intent.headers()
                )
            except httpx.HTTPError as exc:
                outcome.problems.append(f"intent {intent.number}: last retry failed: {exc!r}")
                return
        if response.status_code in FINAL:
            record_final(intent, outcome, response)
        else:
            outcome.problems.append(
                f"intent {intent.number}: last retry answered {response.status_code}: "
                f"{response.text[:200]}"
            )

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        await asyncio.gather(*(once(client, intent) for intent in clients.intents))


def stuck_in_sqlite(path: Path) -> list[str]:
    now = time.time()
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        rows = conn.execute(
            "SELECT key, lease_until FROM oncely_records WHERE state = 'in_flight'"
        ).fetchall()
    return [f"key {k} in flight, lease over {now - u:.1f} s ago" for k, u in rows if u < now]


def stuck_in_postgres(url: str, schema: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f'SELECT key, extract(epoch FROM now()) - lease_until FROM "{schema}".oncely_records '
            "WHERE state = 'in_flight' AND lease_until < extract(epoch FROM now())"
        ).fetchall()
    return [f"key {k} in flight, lease over {float(late):.1f} s ago" for k, late in rows]


def stuck_in_redis(url: str, prefix: str) -> list[str]:
    """Keys under ``prefix`` in flight past their lease, by the store's own ``stats`` (a SCAN of
    the prefix on Redis's clock): keys are named by their hash, as stats names them."""
    from oncely import open_store
    from oncely.events import Inspectable

    store = open_store(url, prefix=prefix)
    try:
        if not isinstance(store, Inspectable):
            raise TypeError(f"the store {url!r} cannot say what it holds (no stats)")
        stats = store.stats(limit=STUCK_LIMIT)
    finally:
        store.close()
    stuck = [
        f"key {k.key_hash} in flight (attempt {k.attempt}), lease over {-k.lease_left:.1f} s ago"
        for k in stats.in_flight_keys
        if k.lease_left < 0
    ]
    if stats.in_flight > len(stats.in_flight_keys):  # beyond the limit: unlisted, not unseen
        stuck.append(f"{stats.in_flight - len(stats.in_flight_keys)} more keys in flight")
    return stuck


def _glob(prefix: str) -> str:
    """A SCAN pattern for every key under ``prefix``, its glob characters escaped."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"


def plant_unrecorded(url: str, prefix: str) -> str:
    """One completed record under ``prefix`` made in flight again, its lease over and its
    response gone, as when the response's write never landed (tests only); its Redis key."""
    import redis

    with redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30) as client:
        seconds, micros = client.time()
        past = repr(seconds + micros / 1_000_000 - 5.0)
        for name in client.scan_iter(match=_glob(prefix), count=1000):
            if client.hget(name, "state") == b"completed":
                client.hset(name, mapping={"state": "in_flight", "lease_until": past})
                client.hset(name, "expires_at", past)
                client.hdel(name, "response")
                return bytes(name).decode()
    raise RuntimeError(f"no completed record under {prefix!r} to plant")


def delete_redis_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (the run's own); how many there were."""
    import redis

    deleted = 0
    with redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30) as client:
        names = list(client.scan_iter(match=_glob(prefix), count=1000))
        for at in range(0, len(names), 1000):
            deleted += int(client.delete(*names[at : at + 1000]))
    return deleted


PLANT = (
    "INSERT INTO payments (id, tenant, customer, amount, currency, status, order_id, "
    "created, updated) SELECT 'pay_planted', tenant, customer, amount, currency, status, "
    "order_id, created, updated FROM payments WHERE status = 'succeeded' LIMIT 1"
)


def plant_duplicate(dialect: str, where: str) -> None:
    """A second payment for one intent, written straight into the ledger (tests only)."""
    if dialect == "sqlite":
        with contextlib.closing(sqlite3.connect(where, timeout=30)) as conn, conn:
            conn.execute(PLANT)
        return
    import psycopg

    url, schema = where.rsplit("#", 1)
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(f'SET search_path = "{schema}"')
        pg.execute(PLANT)


# ---------------------------------------------------------------------------------------------
# One store's run


def _store_url(name: str) -> str:
    return STORES.get(name, name)


def _dialect(url: str) -> str:
    if url.startswith("sqlite"):
        return "sqlite"
    return "redis" if url.startswith("redis") else "postgresql"


async def run_store(cfg: NemesisConfig, name: str, seed: int, say: Any = print) -> StoreRun:
    url = _store_url(name)
    dialect = _dialect(url)
    run = StoreRun(
        store=dialect if url == STORES.get(dialect) else name, seed=seed, processes=cfg.processes
    )
    rng = random.Random(seed)
    began = time.monotonic()
    schema = f"nemesis_{secrets.token_hex(5)}"
    prefix = f"nemesis-{secrets.token_hex(5)}:"  # Redis: the run's keys, deleted at the end
    run.namespace = {"postgresql": schema, "redis": prefix}.get(dialect)
    with tempfile.TemporaryDirectory(prefix="oncely-nemesis-") as tmp:
        workdir = Path(tmp)
        db = workdir / "payments.db"  # the ledger on SQLite and on Redis (apart from the store)
        proxies: list[StoreProxy | None] = []
        services: list[ServiceProcess] = []
        env_unfenced = {UNFENCED_ENV: "1"} if cfg.unfenced else {}
        try:
            for i in range(cfg.processes):
                store = f"sqlite:{db}"
                extra: list[str] = []
                proxy: StoreProxy | None = None
                if dialect != "sqlite":
                    target = httpx.URL(url)
                    default_port = 6379 if dialect == "redis" else 5432
                    protocol = "redis" if dialect == "redis" else "postgres"
                    proxy = StoreProxy((target.host, target.port or default_port), protocol)
                    proxy.start()
                    store = str(target.copy_with(port=proxy.port))
                    if dialect == "redis":
                        # The ledger in a SQL database apart from the store: a SQLite file.
                        extra = ["--store-prefix", prefix, "--database", f"sqlite:{db}"]
                    else:
                        extra = ["--schema", schema]
                proxies.append(proxy)
                command = [
                    sys.executable, "-m", "oncely_payments", "--store", store, *extra,
                    "--host", LOOPBACK, "--card-latency-ms", repr(cfg.card_latency_ms),
                    "--card-failure-rate", "0.02", "--card-network-db",
                    str(workdir / "card-network.db"), "--lease", repr(cfg.lease),
                    "--ttl", "3600", "--log-level", "warning",
                ]  # fmt: skip
                service = ServiceProcess(command, workdir / f"service-{i}.log", workdir)
                services.append(service)
            with _env(env_unfenced):
                await services[0].start()  # first alone: it creates the tables
                await asyncio.gather(*(service.start() for service in services[1:]))
                fleet = Fleet(services, proxies)
                stop = asyncio.Event()
                clients = Clients(cfg, run, random.Random(rng.random()), fleet)
                traffic = asyncio.create_task(clients.run_all(stop))
                attacks = asyncio.create_task(
                    nemesis(cfg, run, random.Random(rng.random()), fleet, stop)
                )
                await asyncio.wait({traffic, attacks}, timeout=cfg.duration)
                stop.set()
                await attacks
                await traffic
            run.intents = len(clients.intents)
            run.duration = time.monotonic() - began
            # Past every lease, so that a key left in flight counts as stuck.
            await asyncio.sleep(cfg.lease + 0.5)
            if cfg.plant_duplicate:
                plant_duplicate(
                    "postgresql" if dialect == "postgresql" else "sqlite",
                    f"{url}#{schema}" if dialect == "postgresql" else str(db),
                )
            if cfg.plant_unrecorded:
                if dialect != "redis":
                    raise ValueError("plant_unrecorded is for Redis runs")
                await asyncio.to_thread(plant_unrecorded, url, prefix)

            async def stuck() -> list[str]:
                if dialect == "sqlite":
                    return stuck_in_sqlite(db)
                if dialect == "redis":
                    return await asyncio.to_thread(stuck_in_redis, url, prefix)
                return stuck_in_postgres(url, schema)

            run.stuck = await stuck()
            if run.stuck:
                # Answered while the outcome's write went on, and the write never landed (the
                # store down through a lease, the process killed): a retry must take the key
                # over and answer the payment kept; then nothing may be left in flight.
                run.unrecorded, run.stuck = run.stuck, []
                await last_retry(clients, services[0].url)
                await asyncio.sleep(cfg.lease + 0.5)
                run.stuck = await stuck()
            async with httpx.AsyncClient(base_url=services[0].url, timeout=30.0) as direct:
                run.report = await audit(
                    clients.intents,
                    clients.outcomes,
                    ApiLedger(direct),
                    charges=card_network_charges(workdir / "card-network.db"),
                )
            run.payments = run.report.payments
        except Exception as exc:  # a broken run is a failed run, with its reason
            run.error = f"{type(exc).__name__}: {exc}"
            for service in services:
                tail = service.log_tail(10)
                if tail:
                    say(tail)
        finally:
            for service in services:
                _signal(service, signal.SIGCONT)
                await service.stop()
            for proxy in proxies:
                if proxy is not None:
                    proxy.stop()
            if dialect == "postgresql":
                with contextlib.suppress(Exception):
                    import psycopg

                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            elif dialect == "redis":
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(delete_redis_prefix, url, prefix)
    return run


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Any:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# The command line


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> NemesisConfig:
    d = NemesisConfig()
    p = argparse.ArgumentParser(
        prog="python -m oncely_payments.nemesis",
        description="The payments service as several processes on one store, under SIGKILL, "
        "SIGSTOP past the lease, store connection faults and duplicated, reordered retries; "
        "then an audit; the report ends with one audit line per store. Exits 0 when every "
        "audit is clean, 1 on any violation (or a run that broke), 2 on a usage error. "
        "With no options: SQLite, PostgreSQL (127.0.0.1:5432, database test) and Redis "
        f"(127.0.0.1:6379), {d.duration:g} s of faults each, about 5 minutes in all.",
    )
    p.add_argument(
        "--store",
        action="append",
        help="sqlite, postgresql, redis, or a sqlite:, postgresql:// or redis:// URL; repeat "
        "for several (default: all three, one after another)",
    )
    p.add_argument(
        "--duration", type=_seconds, help=f"seconds of faults per store (default {d.duration:g})"
    )
    p.add_argument("--processes", type=_positive, default=d.processes, help="service processes")
    p.add_argument("--clients", type=_positive, default=d.clients, help="concurrent clients")
    p.add_argument("--lease", type=_seconds, default=d.lease, help="seconds (default 2)")
    p.add_argument("--seed", type=int, help="default: random, and shown")
    p.add_argument("--json", type=Path, dest="json_path", help="write the report as JSON here")
    p.add_argument(
        "--plant-duplicate",
        action="store_true",
        help="tests of the audit only: write a second payment for one intent into the ledger "
        "before each audit, which must then fail (exit status 1)",
    )
    a = p.parse_args(argv)
    stores = tuple(a.store or d.stores)
    for store in stores:
        if store not in STORES and not store.startswith(("sqlite:", "postgres", "redis://")):
            p.error(
                f"store {store!r}: sqlite, postgresql, redis, or a sqlite:, postgresql:// or "
                "redis:// URL"
            )
    duration = a.duration or d.duration
    return NemesisConfig(
        stores=stores,
        duration=duration,
        processes=a.processes,
        clients=a.clients,
        lease=a.lease,
        seed=a.seed,
        json_path=a.json_path,
        plant_duplicate=a.plant_duplicate,
    )


async def run_all(cfg: NemesisConfig) -> list[StoreRun]:
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(32)
    print(
        f"oncely nemesis: stores {', '.join(cfg.stores)}; {cfg.processes} processes, "
        f"{cfg.clients} clients, {cfg.duration:g} s each; seed {seed}",
        flush=True,
    )
    runs = []
    for n, store in enumerate(cfg.stores):
        run = await run_store(cfg, store, seed + n)
        verdict = "ok" if run.ok else "FAILED"
        print(
            f"[{n + 1}/{len(cfg.stores)}] {run.store} (seed {run.seed}): {run.intents} payments "
            f"in {run.duration:.0f} s, audit {verdict}",
            flush=True,
        )
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    runs = asyncio.run(run_all(cfg))
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps([r.to_json() for r in runs], indent=2) + "\n")
    for run in runs:
        for problem in [*run.report.problems, *run.stuck][:10]:
            print(f"  {run.store}: {problem}")
    for run in runs:  # the report ends with one audit line per store
        print(run.line())
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
