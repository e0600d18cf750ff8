"""The oncely command against real stores (SQLite, PostgreSQL, Redis), as a real subprocess
where the exit status matters."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oncely import Claimed, StoredResponse, storage_key
from oncely.stores import AsyncStore, open_async_store
from oncely.stores._rules import claimed_at
from oncely.stores.memory import AsyncMemoryStore
from oncely.stores.sqlite import AsyncSQLiteStore

from .stores.backend_postgres import URL as POSTGRES_URL
from .stores.backend_postgres import scratch_schema
from .stores.backend_redis import REDIS_URL, delete_prefix, redis_store


def oncely(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oncely", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def seed(store: AsyncStore) -> None:
    """acme/k-1 completed; acme/k-2 in flight with a recovery point; one record expired."""
    claim = await store.claim(storage_key("acme", "k-1"), "v1:" + "a" * 64, lease=10)
    assert isinstance(claim, Claimed)
    kept = StoredResponse(201, (("content-type", "application/json"),), b"{}")
    assert await store.complete(claim, kept, ttl=600, tombstone_ttl=600)
    running = await store.claim(storage_key("acme", "k-2"), "v1:" + "b" * 64, lease=300)
    assert isinstance(running, Claimed)
    assert await store.record_phase(running, "payment_created", '{"id": "pay_1"}')
    old = await store.claim(storage_key("acme", "old"), "v1:" + "c" * 64, lease=10)
    assert isinstance(old, Claimed)
    assert await store.complete(old, kept, ttl=0.001, tombstone_ttl=0.001)


@pytest.fixture(params=["sqlite", "postgres", "redis"])
async def store_args(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[str]]:
    """A seeded store of each kind, as the flags that name it."""
    if request.param == "sqlite":
        url = f"sqlite:{tmp_path / 'cli.db'}"
        store: AsyncStore = AsyncSQLiteStore(tmp_path / "cli.db")
        await seed(store)
        await store.aclose()
        yield ["--store", url]
    elif request.param == "postgres":
        async with scratch_schema() as schema:
            store = open_async_store(POSTGRES_URL, schema=schema)
            try:
                await seed(store)
            finally:
                await store.aclose()
            yield ["--store", POSTGRES_URL, "--schema", schema]
    else:
        redis = await redis_store()
        try:
            await seed(redis)
            yield ["--store", REDIS_URL, "--prefix", redis.prefix]
        finally:
            await delete_prefix(redis.client, redis.prefix)
            await redis.aclose()


async def test_inspect_stats_and_purge_on_every_store(store_args: list[str]) -> None:
    await asyncio.sleep(0.01)  # "old" is past its retention
    shown = oncely("inspect", *store_args, "--tenant", "acme", "--key", "k-2", "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["state"] == "in_flight"
    assert record["fingerprint_version"] == "v1"
    assert record["recovery_points"] == [{"name": "payment_created", "data": {"id": "pay_1"}}]
    assert 250 < record["lease_left"] <= 300
    # The owner's age: since its claim in seed(), before this test's command started.
    assert 0 < record["owner_age"] < 60
    assert abs(record["claimed_at"] + record["owner_age"] - time.time()) < 60
    held = oncely("inspect", *store_args, "--tenant", "acme", "--key", "k-2")
    assert held.returncode == 0, held.stderr
    assert re.search(r"owner      attempt 1, holding it for \d+\.\d s \(claimed 20", held.stdout)
    human = oncely("inspect", *store_args, "--scope", "acme", "--key", "k-1")
    assert human.returncode == 0, human.stderr
    assert "state      completed" in human.stdout
    assert "response   201, 2 bytes" in human.stdout
    assert "content-type: application/json" in human.stdout
    assert "owner " not in human.stdout  # completed: nobody holds it
    done_json = json.loads(
        oncely("inspect", *store_args, "--tenant", "acme", "--key", "k-1", "--json").stdout
    )
    assert (done_json["state"], done_json["lease_left"]) == ("completed", None)
    unknown = oncely("inspect", *store_args, "--tenant", "other", "--key", "k-1")
    assert unknown.returncode == 1
    assert "no record for key 'k-1' of tenant 'other'" in unknown.stderr
    stats = oncely("stats", *store_args, "--json")
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    assert (counts["in_flight"], counts["completed"], counts["tombstones"]) == (1, 1, 0)
    assert [k["attempt"] for k in counts["in_flight_keys"]] == [1]
    # The lease's age: since its claim in seed(), as inspect's owner_age says.
    assert 0 < counts["in_flight_keys"][0]["age"] < 60
    assert 250 < counts["in_flight_keys"][0]["lease_left"] <= 300
    human_stats = oncely("stats", *store_args).stdout
    assert "in flight   1" in human_stats
    assert re.search(r"oldest lease claimed \d+\.\d s ago", human_stats)
    assert re.search(r"attempt 1  claimed \d+\.\d s ago  lease ends in \d+", human_stats)
    if "redis" not in store_args[1]:  # Redis forgets by itself (PEXPIRE): nothing to purge
        assert counts["expired"] == 1
    purged = oncely("purge", *store_args, "--expired", "--batch", "1")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == f"purged {counts['expired']} expired records"
    assert json.loads(oncely("stats", *store_args, "--json").stdout)["expired"] == 0


async def test_purge_pauses_between_batches(tmp_path: Path) -> None:
    """Five expired records in batches of two: two pauses of 0.4 s (after the two full
    batches), none after the last; with --pause 0 the same purge goes back to back."""

    async def expire(path: Path) -> None:
        store = AsyncSQLiteStore(path)
        kept = StoredResponse(201, (), b"{}")
        for n in range(5):
            claim = await store.claim(storage_key("acme", f"old-{n}"), "v1:" + "c" * 64, lease=10)
            assert isinstance(claim, Claimed)
            assert await store.complete(claim, kept, ttl=0.001, tombstone_ttl=0.001)
        await store.aclose()
        await asyncio.sleep(0.01)

    took = {}
    for pause in ("0.4", "0"):
        path = tmp_path / f"pause-{pause}.db"
        await expire(path)
        began = time.monotonic()
        done = oncely(
            "purge", "--store", f"sqlite:{path}", "--expired", "--batch", "2", "--pause", pause
        )
        took[pause] = time.monotonic() - began
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "purged 5 expired records"
        assert done.stderr.count("purged ") == 3  # one progress line per batch
    assert took["0.4"] >= 0.8 + took["0"] * 0.5, took


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["stats", "--store", "mongodb://x"], 2, "the known schemes are"),
        (["stats", "--store", "sqlite:"], 2, "needs a file"),
        (["purge", "--store", "memory:"], 2, "--expired"),
        (["purge", "--store", "memory:", "--expired", "--pause", "soon"], 2, "--pause takes"),
        (["purge", "--store", "memory:", "--expired", "--pause", "-1"], 2, "--pause takes"),
        (["migrate", "--store", "sqlite:x.db", "--schema", "s"], 2, "--schema is for PostgreSQL"),
        (["stats", "--store", "redis://127.0.0.1:1/0", "--table", "t"], 2, "--table for SQLite"),
        (["stats", "--store", "memory:", "--prefix", "p"], 2, "--prefix for Redis"),
        (["inspect", "--store", "memory:", "--key", "k"], 2, "--tenant"),
        (["stats", "--store", "redis://127.0.0.1:1/0"], 1, "Check the store URL"),
        (["stats", "--store", "sqlite:no/such/folder/x.db"], 1, "no SQLite file at"),
        (["inspect", "--store", "sqlite:typo.db", "--tenant", "a", "--key", "k"], 1, "no SQLite"),
        # The server's own words, not only that psycopg's pool timed out.
        (["stats", "--store", "postgresql://u@127.0.0.1:1/x"], 1, "port 1 failed: Connection"),
    ],
)
def test_bad_input_exits_with_a_clear_message(
    args: list[str], status: int, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    done = oncely(*args)
    assert done.returncode == status, done.stderr
    assert says in done.stderr


def test_help_has_examples() -> None:
    done = oncely("--help")
    assert done.returncode == 0
    assert "oncely inspect --store sqlite:oncely.db --tenant acme" in done.stdout
    assert "--scope" not in oncely("inspect", "--help").stdout
    for command in ("serve", "demo"):
        shown = oncely(command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "examples" in shown.stdout, command


def test_migrate_creates_the_table_and_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    for _ in range(2):
        done = oncely("migrate", "--store", f"sqlite:{db}", "--table", "idem_keys")
        assert done.returncode == 0, done.stderr
        assert "schema is up to date" in done.stdout
    with sqlite3.connect(db) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert tables == [("idem_keys",)]


SRC = Path(__file__).resolve().parent.parent / "src"


def test_serve_and_demo_say_how_to_install_the_service() -> None:
    # -I -S: no site-packages, so no entry point of the installed service is visible.
    for name in ("serve", "demo"):
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c",
             f"import sys; sys.path.insert(0, {str(SRC)!r}); "
             f"from oncely.cli import main; sys.exit(main([{name!r}]))"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert "pip install" in done.stderr
        assert "oncely-payments" in done.stderr


def test_demo_is_found_through_the_entry_point() -> None:
    done = oncely("demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "--intents" in done.stdout


async def test_the_owner_age_starts_again_at_a_takeover() -> None:
    store = AsyncMemoryStore()
    key = storage_key("acme", "k-takeover")
    first = await store.claim(key, "v1:" + "d" * 64, lease=0.01)
    assert isinstance(first, Claimed)
    await asyncio.sleep(0.05)
    second = await store.claim(key, "v1:" + "d" * 64, lease=10)
    assert isinstance(second, Claimed)
    assert second.attempt == 2
    first_at, second_at = claimed_at(first.token), claimed_at(second.token)
    assert first_at is not None
    assert second_at is not None
    assert second_at - first_at >= 0.04
    assert abs(time.time() - second_at) < 5
    assert claimed_at("a" * 32) is None  # a token of an older version: no time, no age
    assert claimed_at("zzzzzzzzzzzz." + "0" * 20) is None


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """oncely stats | head -c 1: the pipe closes before the output is written."""
    with subprocess.Popen(
        [sys.executable, "-m", "oncely", "stats", "--store", f"sqlite:{tmp_path / 'x.db'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as shown:
        assert shown.stdout is not None
        assert shown.stderr is not None
        shown.stdout.close()  # the reader is gone
        errors = shown.stderr.read()
        shown.wait(timeout=60)
    assert "Traceback" not in errors, errors


async def test_inspect_says_when_a_completed_record_is_a_tombstone(tmp_path: Path) -> None:
    store = AsyncSQLiteStore(tmp_path / "t.db")
    claim = await store.claim(storage_key("acme", "k"), "v1:" + "a" * 64, lease=10)
    assert isinstance(claim, Claimed)
    kept = StoredResponse(201, (("content-type", "application/json"),), b"{}")
    assert await store.complete(claim, kept, ttl=0.001, tombstone_ttl=600)
    await store.aclose()
    await asyncio.sleep(0.01)
    shown = oncely(
        "inspect", "--store", f"sqlite:{tmp_path / 't.db'}", "--tenant", "acme", "--key", "k"
    )
    assert shown.returncode == 0, shown.stderr
    assert "a tombstone (a repeat gets 410)" in shown.stdout


async def expired_records(path: Path, count: int) -> None:
    store = AsyncSQLiteStore(path)
    kept = StoredResponse(201, (), b"{}")
    for n in range(count):
        claim = await store.claim(storage_key("acme", f"k{n}"), "v1:" + "a" * 64, lease=10)
        assert isinstance(claim, Claimed)
        assert await store.complete(claim, kept, ttl=0.001, tombstone_ttl=0.001)
    await store.aclose()
    await asyncio.sleep(0.01)


def test_an_interrupted_purge_says_how_many_it_purged(tmp_path: Path) -> None:
    asyncio.run(expired_records(tmp_path / "p.db", 3))
    args = ["purge", "--store", f"sqlite:{tmp_path / 'p.db'}", "--expired", "--batch", "1"]
    with subprocess.Popen(
        [sys.executable, "-m", "oncely", *args, "--pause", "30"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    ) as purge:
        assert purge.stderr is not None
        assert purge.stderr.readline().startswith("purged 1 of 3")
        purge.send_signal(signal.SIGINT)  # Ctrl-C during the pause after the first batch
        errors = purge.stderr.read()
        assert purge.wait(timeout=60) == 130
    assert "stopped; purged 1 expired records" in errors
    assert "Traceback" not in errors


async def test_reading_a_postgres_schema_that_is_not_there_creates_nothing() -> None:
    """inspect, stats and purge on a mistyped --schema say the table is missing (exit 1) and
    leave the database as it was; migrate makes it, and then they answer."""
    import psycopg

    async with scratch_schema() as schema:
        store_args = ["--store", POSTGRES_URL, "--schema", schema]
        for command in (
            ["inspect", *store_args, "--tenant", "acme", "--key", "k-1"],
            ["stats", *store_args],
            ["purge", *store_args, "--expired"],
        ):
            done = oncely(*command)
            assert done.returncode == 1, done.stderr
            assert f"no oncely table {schema}.oncely_records in this database" in done.stderr
            assert "oncely migrate" in done.stderr
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
            )
            assert await cur.fetchone() == (0,)
        assert oncely("migrate", *store_args).returncode == 0
        stats = oncely("stats", *store_args, "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["in_flight"] == 0
