"""Every store, both sides, against the rules of ``stores/_rules.py``: a Hypothesis state machine.

The model is a dict of records changed only by the rule functions; each step runs one operation
(claim, complete, release, renew, record a phase, purge, advance the clock) on the real store and
on the model, and the answers must agree; after each step every key's record must agree too.

Time is the model's: ``t`` seconds since the example began. The memory and SQLite stores read an
injected clock; PostgreSQL and Redis read their server's clock, which the test holds still by
setting ``time_offset`` before each call so that the store's now is the example's start plus
``t`` (give or take the call's own latency). Leases and TTLs end on half seconds, the clock moves
by whole seconds, and a release (whose lease ends at its own now) is followed by one more
second, so no step ever lands on a boundary: those few milliseconds cannot change an answer.
Each example has a store of its own (a new file, table or key prefix).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from oncely import Claimed, Existing, Record, StoredResponse
from oncely.stores import _rules
from oncely.stores.memory import AsyncMemoryStore, MemoryStore
from oncely.stores.postgres import AsyncPostgresStore, PostgresStore
from oncely.stores.redis import AsyncRedisStore, RedisStore
from oncely.stores.sqlite import AsyncSQLiteStore, SQLiteStore

from ..conftest import Clock, service_missing
from .backend_postgres import URL as POSTGRES_URL
from .backend_redis import REDIS_URL

KEYS = ("k0", "k1", "k2")
FINGERPRINTS = ("v1:" + "a" * 64, "v1:" + "b" * 64)
RESPONSES = (
    StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}'),
    StoredResponse(200, (), bytes(range(256)) + b"\0"),
    StoredResponse(201, (("location", "/payments/pay_9"),), b"", replayable=False),
)
LEASES = st.sampled_from([5.5, 30.5])
TTLS = st.sampled_from([10.5, 60.5])
TOMBSTONE_TTLS = st.sampled_from([10.0, 100.0])
ADVANCES = st.sampled_from([1, 5, 10, 30, 100, 700_000])  # the last passes ABANDONED_RETENTION
TOLERANCE = 0.25  # seconds a server-clock store's times may differ from the model's

MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class Driver:
    """One store (one side of one backend) as the machine drives it: call an operation, set
    the store's clock to the example's ``t``, close."""

    def __init__(
        self,
        store: Any,
        *,
        runner: asyncio.Runner | None,
        set_clock: Callable[[float], None],
        base: float,
        cleanup: Callable[[], None] = lambda: None,
    ) -> None:
        self.store, self.runner, self.set_clock, self.base = store, runner, set_clock, base
        self.cleanup = cleanup

    def call(self, op: str, t: float, *args: Any, **kwargs: Any) -> Any:
        self.set_clock(t)
        result = getattr(self.store, op)(*args, **kwargs)
        return result if self.runner is None else self.runner.run(result)

    def close(self) -> None:
        try:
            if self.runner is None:
                self.store.close()
            else:
                self.runner.run(self.store.aclose())
                self.runner.close()
        finally:
            self.cleanup()


@dataclass
class Place:
    """Where one test puts its stores: a directory, a PostgreSQL schema."""

    tmp_path: Path
    schema: str


def _runner(sync: bool) -> asyncio.Runner | None:
    return None if sync else asyncio.Runner()


def _memory(place: Place, sync: bool) -> Driver:
    clock = Clock()
    base = clock.now
    store = MemoryStore(clock=clock) if sync else AsyncMemoryStore(clock=clock)

    def set_clock(t: float) -> None:
        clock.now = base + t

    return Driver(store, runner=_runner(sync), set_clock=set_clock, base=base)


def _sqlite(place: Place, sync: bool) -> Driver:
    clock = Clock()
    base = clock.now
    path = place.tmp_path / f"{secrets.token_hex(4)}.db"
    store = SQLiteStore(path, clock=clock) if sync else AsyncSQLiteStore(path, clock=clock)

    def set_clock(t: float) -> None:
        clock.now = base + t

    return Driver(store, runner=_runner(sync), set_clock=set_clock, base=base)


def _held_still(store: Any) -> tuple[Callable[[float], None], float]:
    """A server clock held at the example's start plus ``t`` (see the module docstring)."""
    base = time.time()

    def set_clock(t: float) -> None:
        store.time_offset = base + t - time.time()

    return set_clock, base


def _postgres(place: Place, sync: bool) -> Driver:
    options = {"schema": place.schema, "table": f"sm_{secrets.token_hex(4)}", "min_size": 0}
    cls = PostgresStore if sync else AsyncPostgresStore
    store = cls.from_url(POSTGRES_URL, **options)
    set_clock, base = _held_still(store)
    return Driver(store, runner=_runner(sync), set_clock=set_clock, base=base)


def _redis(place: Place, sync: bool) -> Driver:
    prefix = f"oncely-test:sm:{secrets.token_hex(6)}:"
    cls = RedisStore if sync else AsyncRedisStore
    store = cls.from_url(REDIS_URL, prefix=prefix)
    set_clock, base = _held_still(store)

    def cleanup() -> None:
        with redis.Redis.from_url(REDIS_URL) as client:
            names = list(client.scan_iter(match=prefix + "*", count=1000))
            if names:
                client.delete(*names)

    return Driver(store, runner=_runner(sync), set_clock=set_clock, base=base, cleanup=cleanup)


BACKENDS: dict[str, Callable[[Place, bool], Driver]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
    "redis": _redis,
}


def _relative(record: Record, base: float) -> Record:
    """``record`` with its times as seconds since ``base``."""
    return Record(
        key=record.key,
        fingerprint=record.fingerprint,
        state=record.state,
        token=record.token,
        attempt=record.attempt,
        lease_until=record.lease_until - base,
        expires_at=record.expires_at - base,
        forget_at=record.forget_at - base,
        response=record.response,
        phases=record.phases,
    )


def _assert_same(stored: Record | None, model: Record | None, base: float) -> None:
    if model is None or stored is None:
        assert stored == model
        return
    got = _relative(stored, base)
    for name in ("key", "fingerprint", "state", "token", "attempt", "response", "phases"):
        assert getattr(got, name) == getattr(model, name), (name, got, model)
    for name in ("lease_until", "expires_at", "forget_at"):
        assert abs(getattr(got, name) - getattr(model, name)) < TOLERANCE, (name, got, model)


class StoreMachine(RuleBasedStateMachine):
    """The real store and the rules, step by step."""

    factory: Callable[[], Driver]

    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.driver = self.factory()
        self.t = 0.0
        self.model: dict[str, Record] = {}

    def teardown(self) -> None:
        self.driver.close()

    def _apply(self, key: str, change: _rules.Change) -> None:
        if change is _rules.DELETE:
            del self.model[key]
        elif change is not _rules.KEEP:
            self.model[key] = change

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        return self.driver.call(op, self.t, *args, **kwargs)

    @initialize()
    def start(self) -> None:
        self.driver.set_clock(0.0)

    @rule(target=claims, key=st.sampled_from(KEYS), fp=st.sampled_from(FINGERPRINTS), lease=LEASES)
    def claim(self, key: str, fp: str, lease: float) -> Claimed:
        got = self._call("claim", key, fp, lease=lease)
        token = got.token if isinstance(got, Claimed) else None
        want, change = _rules.claim_rule(
            self.model.get(key), key, fp, lease=lease, now=self.t, token=token
        )
        assert type(got) is type(want), (got, want)
        if isinstance(got, Claimed):
            assert isinstance(want, Claimed)
            assert (got.key, got.fingerprint, got.attempt, got.phases) == (
                want.key,
                want.fingerprint,
                want.attempt,
                want.phases,
            )
            assert abs(got.lease_until - self.driver.base - want.lease_until) < TOLERANCE
        else:
            assert isinstance(got, Existing)
            assert isinstance(want, Existing)
            _assert_same(got.record, want.record, self.driver.base)
        self._apply(key, change)
        # Claims that lost are kept too: a write with a token that never owned the key is fenced.
        return got if isinstance(got, Claimed) else _stranger(key, fp)

    @rule(
        claim=claims,
        response=st.sampled_from(RESPONSES),
        ttl=TTLS,
        tombstone_ttl=TOMBSTONE_TTLS,
    )
    def complete(
        self, claim: Claimed, response: StoredResponse, ttl: float, tombstone_ttl: float
    ) -> None:
        got = self._call("complete", claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl)
        want, change = _rules.complete_rule(
            self.model.get(claim.key),
            claim,
            response,
            ttl=ttl,
            tombstone_ttl=tombstone_ttl,
            now=self.t,
        )
        assert got == want
        self._apply(claim.key, change)

    @rule(claim=claims)
    def release(self, claim: Claimed) -> None:
        got = self._call("release", claim)
        want, change = _rules.release_rule(self.model.get(claim.key), claim, now=self.t)
        assert got == want
        self._apply(claim.key, change)
        self.t += 1  # the lease ended now: move off that boundary (see the module docstring)

    @rule(claim=claims, lease=LEASES)
    def renew(self, claim: Claimed, lease: float) -> None:
        got = self._call("renew", claim, lease=lease)
        want, change = _rules.renew_rule(self.model.get(claim.key), claim, lease=lease, now=self.t)
        assert got == want
        self._apply(claim.key, change)

    @rule(claim=claims, name=st.sampled_from(["created", "charged"]), n=st.integers(0, 9))
    def record_phase(self, claim: Claimed, name: str, n: int) -> None:
        data = f'{{"n":{n}}}'
        got = self._call("record_phase", claim, name, data)
        want, change = _rules.phase_rule(self.model.get(claim.key), claim, name, data)
        assert got == want
        self._apply(claim.key, change)

    @rule()
    def purge(self) -> None:
        got = self._call("purge")
        deleted = 0
        for key, record in list(self.model.items()):
            verdict = _rules.purge_rule(record, now=self.t)
            if verdict == "delete":
                del self.model[key]
                deleted += 1
            elif verdict == "strip":
                self.model[key] = _rules.strip(record)
        assert got == deleted

    @rule(seconds=ADVANCES)
    def advance(self, seconds: int) -> None:
        self.t += seconds

    @invariant()
    def every_record_agrees(self) -> None:
        for key in KEYS:
            _assert_same(self._call("get", key), self.model.get(key), self.driver.base)


def _stranger(key: str, fp: str) -> Claimed:
    """A claim that never owned ``key``: every write with it must be refused."""
    return Claimed(key=key, fingerprint=fp, token=_rules.new_token(), attempt=1, lease_until=0.0)


@contextmanager
def _place(backend: str, tmp_path: Path) -> Iterator[Place]:
    schema = f"oncely_test_{secrets.token_hex(6)}"
    if backend == "postgres":
        try:
            psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
        except psycopg.OperationalError as exc:
            service_missing(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    if backend == "redis":
        try:
            with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1) as client:
                client.ping()
        except (redis.RedisError, OSError) as exc:
            service_missing(f"Redis not reachable at {REDIS_URL}: {exc}")
    try:
        yield Place(tmp_path, schema)
    finally:
        if backend == "postgres":
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


@pytest.mark.parametrize("side", ["sync", "async"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_store_follows_the_rules(backend: str, side: str, tmp_path: Path) -> None:
    """Any sequence of operations and clock moves gives the answers and records the rules give."""
    with _place(backend, tmp_path) as place:
        machine = type(
            f"StoreMachine_{backend}_{side}",
            (StoreMachine,),
            {"factory": staticmethod(lambda: BACKENDS[backend](place, side == "sync"))},
        )
        run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
