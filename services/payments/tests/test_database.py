"""The unit-of-work drivers: one transaction per unit, rolled back whole, 503 when locked out."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oncely_payments.database import SQLiteDatabase, Work, execute, query
from oncely_payments.problems import ApiProblem

SCHEMA = ("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, n INTEGER NOT NULL)",)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SQLiteDatabase]:
    made = SQLiteDatabase(tmp_path / "db.sqlite", schema=SCHEMA, busy_timeout=0.2)
    yield made
    await made.aclose()


def insert(row_id: str, n: int, fail: bool = False) -> Work[int]:
    changed = yield from execute("INSERT INTO t VALUES (%(id)s, %(n)s)", id=row_id, n=n)
    if fail:
        raise ValueError("after the insert")
    return changed


def count() -> Work[int]:
    rows = yield from query("SELECT count(*) FROM t WHERE n >= %(least)s", least=0)
    return int(rows[0][0])


async def test_a_unit_of_work_commits_whole_or_not_at_all(db: SQLiteDatabase) -> None:
    assert await db.write(insert("a", 1)) == 1
    with pytest.raises(ValueError, match="after the insert"):
        await db.write(insert("b", 2, fail=True))
    assert await db.read(count()) == 1
    assert await db.ready()


async def test_the_hook_runs_inside_the_transaction_before_commit(db: SQLiteDatabase) -> None:
    def refuse() -> None:
        raise RuntimeError("stop before commit")

    with pytest.raises(RuntimeError, match="before commit"):
        await db.write(insert("a", 1), before_commit=refuse)
    assert await db.read(count()) == 0


async def test_a_database_locked_by_another_writer_is_a_503_problem(
    db: SQLiteDatabase, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(ApiProblem) as caught:
            await db.write(insert("a", 1))
        assert caught.value.status == 503
        assert ("retry-after", "1") in caught.value.headers
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert await db.write(insert("a", 1)) == 1
