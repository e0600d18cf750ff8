"""The oncely command: migrate, purge and inspect against a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from oncely import Claimed, StoredResponse, storage_key
from oncely.cli import main
from oncely.stores.sqlite import AsyncSQLiteStore


def test_migrate_creates_the_table_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "cli.db"
    assert main(["migrate", "--store", f"sqlite:{db}"]) == 0
    assert main(["migrate", "--store", f"sqlite:{db}"]) == 0
    tables = sqlite3.connect(db).execute("SELECT name FROM sqlite_master").fetchall()
    assert ("oncely_records",) in tables
    assert "schema is up to date" in capsys.readouterr().out


def test_an_unknown_store_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--store", "mongodb://x"]) == 1
    err = capsys.readouterr().err
    assert "unknown store URL" in err
    assert "sqlite:" in err


def test_purge_deletes_only_forgotten_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "cli.db"

    async def seed() -> None:
        store = AsyncSQLiteStore(db)
        for key, retention in (("old", 0.0), ("new", 3600.0)):
            claim = await store.claim(key, "fp", lease=10)
            assert isinstance(claim, Claimed)
            done = await store.complete(
                claim, StoredResponse(201), ttl=0.001, tombstone_ttl=retention
            )
            assert done
        await store.aclose()

    asyncio.run(seed())
    assert main(["purge", "--store", f"sqlite:{db}"]) == 0
    assert "purged 1 expired records" in capsys.readouterr().out
    keys = sqlite3.connect(db).execute("SELECT key FROM oncely_records").fetchall()
    assert keys == [("new",)]


def test_inspect_shows_a_record_by_scope_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "cli.db"

    async def seed() -> None:
        store = AsyncSQLiteStore(db)
        claim = await store.claim(storage_key("acme", "k-1"), "v1:fp", lease=10)
        assert isinstance(claim, Claimed)
        await store.complete(claim, StoredResponse(201, body=b"{}"), ttl=60, tombstone_ttl=60)
        await store.aclose()

    asyncio.run(seed())
    assert main(["inspect", "--store", f"sqlite:{db}", "--scope", "acme", "--key", "k-1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "completed"
    assert shown["response"] == {"status": 201, "replayable": True, "bytes": 2}
    assert main(["inspect", "--store", f"sqlite:{db}", "--scope", "other", "--key", "k-1"]) == 0
    assert "no record" in capsys.readouterr().out


def test_migrate_takes_a_table_name(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    assert main(["migrate", "--store", f"sqlite:{db}", "--table", "idem_keys"]) == 0
    with sqlite3.connect(db) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert tables == [("idem_keys",)]


def test_an_option_the_store_does_not_take_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--store", f"sqlite:{tmp_path / 'x.db'}", "--schema", "s"]) == 1
    assert "does not take that option" in capsys.readouterr().err
