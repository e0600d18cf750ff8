"""SQLite files on disk: the table a new store makes, and a file made by an earlier version."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from oncely import Claimed, Existing, StoredResponse
from oncely.stores.sqlite import SQLiteStore

RESPONSE = StoredResponse(status=201, headers=(("content-type", "text/plain"),), body=b"ok")
FP = "v1:" + "a" * 64

#: The table as versions before the rowid table made it (WITHOUT ROWID, no strip index).
EARLIER = """
CREATE TABLE oncely_records (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL,
    token       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    lease_until REAL NOT NULL,
    expires_at  REAL NOT NULL,
    forget_at   REAL NOT NULL,
    response    BLOB,
    phases      TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
CREATE INDEX oncely_records_forget_at ON oncely_records (forget_at);
"""


def _sql(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))


def _round_trip(store: SQLiteStore) -> None:
    claim = store.claim("k", FP, lease=5)
    assert isinstance(claim, Claimed)
    assert store.complete(claim, RESPONSE, ttl=0.001, tombstone_ttl=60)
    kept = store.claim("k", FP, lease=5)
    assert isinstance(kept, Existing)
    assert kept.record.response == RESPONSE
    time.sleep(0.01)
    assert store.purge(limit=10) == 0  # past ttl: stripped to a tombstone, not deleted
    tomb = store.claim("k", FP, lease=5)
    assert isinstance(tomb, Existing)
    assert tomb.record.response is None


def test_a_new_file_has_a_rowid_table_and_the_strip_index(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "new.db")
    _round_trip(store)
    store.close()
    sql = _sql(tmp_path / "new.db")
    assert "WITHOUT ROWID" not in sql["oncely_records"]
    assert "WHERE response IS NOT NULL" in sql["oncely_records_strip"]
    with sqlite3.connect(tmp_path / "new.db") as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN UPDATE oncely_records SET response = NULL WHERE key IN (SELECT "
            "key FROM oncely_records WHERE state = 'completed' AND expires_at <= 1 AND "
            "response IS NOT NULL LIMIT 10)"
        ).fetchall()
    assert any("oncely_records_strip" in row[-1] for row in plan), plan


def test_a_file_made_by_an_earlier_version_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "earlier.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(EARLIER)
    store = SQLiteStore(path)
    _round_trip(store)
    store.close()
    sql = _sql(path)
    assert "WITHOUT ROWID" in sql["oncely_records"]  # its table is left as it was
    assert "oncely_records_strip" in sql  # and it gets the strip index
