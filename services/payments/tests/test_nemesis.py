"""The nemesis: a short run per store passes its audit, and the audit fails when it should.

Each run is the real thing, shortened: two service processes on one store (SQLite; PostgreSQL;
Redis, with the ledger apart in a SQLite file), the clients of oncely's client, SIGKILLs, pauses
past the lease, store connection faults (PostgreSQL and Redis, through the store proxy) and
duplicated, reordered retries. Then runs that must fail: a duplicate payment planted into the
ledger before the audit, and a service whose store's writes ignore the fencing token. And the
command line: its exit status (0, 1, 2) and its report, text and JSON.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from oncely import Claimed, StoredResponse, open_store
from oncely_payments.nemesis import (
    POSTGRES_URL,
    REDIS_URL,
    NemesisConfig,
    StoreRun,
    delete_redis_prefix,
    main,
    run_store,
    stuck_in_redis,
)

pytestmark = [
    pytest.mark.slow,
    # Connections cut by SIGKILL, SIGSTOP and the store proxy are reset mid-flight; asyncio
    # warns about their transports when they are collected.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_reset_transports() -> Iterator[None]:
    """Collect the transports of reset connections here, under this module's filters, rather
    than in whatever test runs next."""
    yield
    gc.collect()


# Late copies wait 0.3-1.5 s (a lease and a half), not up to 3 s: the run ends sooner.
SHORT = NemesisConfig(
    duration=5.0,
    processes=2,
    clients=8,
    lease=1.0,
    fault_gap=(0.15, 0.5),
    card_latency_ms=20,
    reorder_delay=(0.3, 1.5),
)
STORES = ["sqlite", "postgresql", "redis"]
CLEAN = {"duplicates": 0, "lost": 0, "stuck": 0, "inconsistent": 0, "other": 0}


def _postgres_or_skip() -> None:
    import psycopg

    from tests.conftest import service_missing

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")


def _redis_or_skip() -> None:
    import redis

    from tests.conftest import service_missing

    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3) as client:
            client.ping()
    except redis.RedisError as exc:
        service_missing(f"Redis not reachable at 127.0.0.1:6379: {exc}")


def _store(name: str) -> str:
    if name == "postgresql":
        _postgres_or_skip()
    elif name == "redis":
        _redis_or_skip()
    return name


def _redis_keys(prefix: str) -> list[bytes]:
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        return list(client.scan_iter(match=prefix + "*", count=1000))


def _schema_exists(schema: str) -> bool:
    import psycopg

    with psycopg.connect(POSTGRES_URL) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (schema,)
        ).fetchone()
    return bool(row and row[0])


def _left_nothing_behind(run: StoreRun) -> None:
    if run.store == "redis":
        assert run.namespace is not None
        assert run.namespace.startswith("nemesis-")
        assert _redis_keys(run.namespace) == []
    elif run.store == "postgresql":
        assert run.namespace is not None
        assert not _schema_exists(run.namespace)


@pytest.mark.parametrize("store", STORES)
async def test_a_short_run_passes_its_audit_under_every_fault(store: str) -> None:
    run: StoreRun = await run_store(SHORT, _store(store), seed=13)
    assert run.error is None, run.error
    assert run.ok, run.line() + "\n" + "\n".join(run.report.problems[:10] + run.stuck)
    assert run.violations == CLEAN
    assert run.intents > 20
    assert run.report.payments == run.intents
    # Faults come in shuffled rounds, process and store faults alternating: the first two are
    # kill and pause on SQLite, one of them and a store fault on PostgreSQL and Redis.
    process_faults = run.faults["pause"] + run.faults["kill"]
    store_faults = run.faults["store-cut"] + run.faults["store-delay"] + run.faults["store-reset"]
    if store == "sqlite":
        assert run.faults["pause"], run.faults
        assert run.faults["kill"], run.faults
        assert store_faults == 0, run.faults
    else:  # the store proxy's faults: PostgreSQL and Redis
        assert process_faults >= 1, run.faults
        assert store_faults >= 1, run.faults
    assert run.faults["duplicate"], run.faults
    assert run.faults["reorder"], run.faults
    assert run.replays > 0
    assert run.retries > 0
    _left_nothing_behind(run)


@pytest.mark.parametrize("store", STORES)
async def test_without_fencing_the_audit_finds_duplicates(store: str) -> None:
    # Every lease ends at once, so a copy of a request takes its key over while the first runs:
    # copies alone make duplicates (more of them than in a real run; no process or store
    # faults). Unfenced, a stale holder's 409 can be kept as a key's response and its intent
    # never gets a final answer: the clients give up sooner than in a real run.
    unfenced = replace(
        SHORT,
        duration=1.5,
        lease=0.5,
        unfenced=True,
        duplicate_rate=0.3,
        fault_gap=(60.0, 60.0),
        intent_deadline=1.5,
    )
    run = await run_store(unfenced, _store(store), seed=15)
    assert run.error is None, run.error
    assert not run.ok
    assert run.violations["duplicates"] > 0, run.line()
    _left_nothing_behind(run)


def test_the_redis_audit_finds_a_key_in_flight_past_its_lease() -> None:
    _redis_or_skip()
    prefix = f"nemesis-test-{time.time_ns()}:"
    store = open_store(REDIS_URL, prefix=prefix)
    try:
        store.claim("stuck", "fp", lease=0.001)
        store.claim("running", "fp", lease=60.0)
        done = store.claim("done", "fp", lease=0.001)
        assert isinstance(done, Claimed)
        assert store.complete(done, StoredResponse(201), ttl=60, tombstone_ttl=60)
        time.sleep(0.05)  # past the first lease, on any clock
        [stuck] = stuck_in_redis(REDIS_URL, prefix)
        assert "in flight (attempt 1), lease over" in stuck
    finally:
        store.close()
        assert delete_redis_prefix(REDIS_URL, prefix) == 3
    assert _redis_keys(prefix) == []
    assert stuck_in_redis(REDIS_URL, prefix) == []


async def test_on_redis_a_planted_duplicate_fails_and_a_key_left_in_flight_is_taken_over() -> None:
    # On Redis the response is written after the ledger's commit; when that write never lands
    # (the store down through a lease, the process killed after answering) the key is left in
    # flight. The last retry must take it over and answer the payment kept, and nothing may be
    # left in flight after it. The planted duplicate must still fail the audit.
    planted = replace(
        SHORT,
        duration=1.0,
        processes=1,
        lease=0.5,
        fault_gap=(60.0, 60.0),
        plant_unrecorded=True,
        plant_duplicate=True,
    )
    run = await run_store(planted, _store("redis"), seed=16)
    assert run.error is None, run.error
    assert len(run.unrecorded) == 1, run.unrecorded
    assert run.stuck == []
    assert not run.ok
    assert run.violations == {**CLEAN, "duplicates": 1}, run.line()
    assert "pay_planted" in run.report.duplicates[0]
    assert run.report.payments == run.intents + 1
    assert "1 answered but left in flight, taken over by the last retry" in run.line()
    _left_nothing_behind(run)


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "mongodb://nowhere"],
        ["--store", "redis+cluster://127.0.0.1:7000"],
        ["--store", "mysql"],
        ["--duration", "0"],
        ["--duration", "-5"],
        ["--duration", "soon"],
        ["--processes", "0"],
    ],
)
def test_a_usage_error_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(argv)
    assert usage.value.code == 2
    assert "error:" in capsys.readouterr().err


def _cli(tmp_path: Path, *stores: str, extra: tuple[str, ...] = ()) -> tuple[int, list[Any]]:
    report = tmp_path / "report.json"
    argv = [a for s in stores for a in ("--store", _store(s))]
    argv += ["--duration", "1", "--processes", "1", "--lease", "0.5", "--seed", "21"]
    code = main([*argv, "--json", str(report), *extra])
    return code, json.loads(report.read_text())


def test_a_clean_run_exits_0_and_reports_in_text_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, entries = _cli(tmp_path, "redis")
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    [entry] = entries
    assert entry["store"] == "redis"
    assert entry["ok"] is True
    assert entry["error"] is None
    assert entry["seed"] == 21
    audit = entry["audit"]
    assert {k: audit[k] for k in CLEAN} == CLEAN
    assert audit["payments"] == entry["intents"] > 0
    assert entry["requests"] >= entry["intents"]
    assert all(isinstance(entry[k], int) for k in ("retries", "replays"))
    faults = entry["faults"]  # by kind, every count positive
    assert all(isinstance(k, str) and isinstance(n, int) and n > 0 for k, n in faults.items())
    # The text report ends with the store's audit line: the JSON's numbers.
    line = out[-1]
    assert line.startswith("redis: audit duplicates 0 lost 0 stuck 0 inconsistent 0 other 0 - ok;")
    assert f"{entry['intents']} payments, {entry['requests']} requests, " in line
    assert f"{entry['retries']} retries, {entry['replays']} replays" in line
    assert "faults: " + ", ".join(f"{k} {n}" for k, n in faults.items()) in line
    assert entry["namespace"].startswith("nemesis-")
    assert _redis_keys(entry["namespace"]) == []


def test_a_planted_duplicate_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, entries = _cli(tmp_path, "sqlite", extra=("--plant-duplicate",))
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1, out
    [entry] = entries
    assert entry["ok"] is False
    assert entry["audit"]["duplicates"] == 1
    assert entry["audit"]["lost"] == entry["audit"]["stuck"] == 0
    assert any("pay_planted" in problem for problem in entry["audit"]["problems"])
    assert out[-1].startswith("sqlite: audit duplicates 1 lost 0 stuck 0 ")
    assert " - FAILED;" in out[-1]
