"""The run journal: one SQLite file that survives a crash of the chain process.

    runs   run_id, chain (its file), name, definition and inputs fingerprints, the inputs
           (secret ones as null), state (running | passed | failed), exit code, times
    steps  run_id, step, iteration, state, the Idempotency-Key, method, URL (redacted),
           status, attempts, replayed, elapsed, captures and body (redacted JSON), the body's
           digest, whether a secret was redacted from them, error (redacted), sends

A step's life, each line one committed transaction (``synchronous=FULL``: on disk before the
next line runs):

    intent   state 'sending': written BEFORE an unsafe request goes out, with its key
    result   state ran | replayed | failed, the status, the captures, the digest
             (a crash between the two leaves 'sending': resume sends again, same key)
    skipped  a condition was not met

Nothing secret is kept: values from ``${ENV:...}``, secret inputs and captures, and the
Authorization and cookie headers are redacted before they are written; a step whose captures
or body lost a secret that way is sent again on resume (with its key: the server replays it).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_JOURNAL", "Journal", "RunRecord", "StepRecord"]

DEFAULT_JOURNAL = "oncely-chains.db"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id      TEXT PRIMARY KEY,
        chain       TEXT,
        name        TEXT NOT NULL,
        definition  TEXT NOT NULL,
        inputs      TEXT NOT NULL,
        input_values TEXT NOT NULL,
        state       TEXT NOT NULL,
        exit_code   INTEGER,
        created     REAL NOT NULL,
        updated     REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS steps (
        run_id    TEXT NOT NULL,
        step      TEXT NOT NULL,
        iteration INTEGER NOT NULL,
        position  INTEGER NOT NULL,
        state     TEXT NOT NULL,
        key       TEXT,
        method    TEXT NOT NULL,
        url       TEXT NOT NULL,
        status    INTEGER,
        attempts  INTEGER NOT NULL DEFAULT 0,
        replayed  INTEGER NOT NULL DEFAULT 0,
        elapsed   REAL NOT NULL DEFAULT 0,
        captures  TEXT,
        body      TEXT,
        digest    TEXT,
        redacted  INTEGER NOT NULL DEFAULT 0,
        error     TEXT,
        sends     INTEGER NOT NULL DEFAULT 0,
        updated   REAL NOT NULL,
        PRIMARY KEY (run_id, step, iteration)
    )""",
)


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    chain: str | None
    name: str
    definition: str
    inputs: str
    input_values: dict[str, Any]
    state: str
    exit_code: int | None
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class StepRecord:
    run_id: str
    step: str
    iteration: int
    position: int
    state: str  # sending | ran | replayed | failed | skipped
    key: str | None
    method: str
    url: str
    status: int | None
    attempts: int
    replayed: bool
    elapsed: float
    captures: dict[str, Any]
    body: Any
    digest: str | None
    redacted: bool
    error: str | None
    sends: int

    @property
    def done(self) -> bool:
        """A result was recorded that later steps can use as it is."""
        return self.state in ("ran", "replayed") and not self.redacted


class Journal:
    """The journal file; every method commits before it returns."""

    def __init__(self, path: str | Path = DEFAULT_JOURNAL, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA busy_timeout = 30000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an intent is on disk before its request goes out.
        self._conn.execute("PRAGMA synchronous = FULL")
        for statement in _SCHEMA:
            self._conn.execute(statement)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # Runs --------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute(
            "SELECT run_id, chain, name, definition, inputs, input_values, state, exit_code, "
            "created, updated FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        return None if row is None else _run(row)

    def runs(self) -> list[RunRecord]:
        rows = self._conn.execute(
            "SELECT run_id, chain, name, definition, inputs, input_values, state, exit_code, "
            "created, updated FROM runs ORDER BY created DESC, run_id"
        ).fetchall()
        return [_run(row) for row in rows]

    def create_run(
        self,
        run_id: str,
        *,
        chain: str | None,
        name: str,
        definition: str,
        inputs: str,
        input_values: dict[str, Any],
    ) -> None:
        now = self._clock()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'running', NULL, ?, ?)",
                (run_id, chain, name, definition, inputs, json.dumps(input_values), now, now),
            )

    def finish_run(self, run_id: str, state: str, exit_code: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE runs SET state = ?, exit_code = ?, updated = ? WHERE run_id = ?",
                (state, exit_code, self._clock(), run_id),
            )

    # Steps -------------------------------------------------------------------------------

    def steps(self, run_id: str) -> list[StepRecord]:
        rows = self._conn.execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY position, iteration",
            (run_id,),
        ).fetchall()
        return [_step(row) for row in rows]

    def step(self, run_id: str, step: str, iteration: int) -> StepRecord | None:
        row = self._conn.execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? AND step = ? AND iteration = ?",
            (run_id, step, iteration),
        ).fetchone()
        return None if row is None else _step(row)

    def intent(
        self,
        run_id: str,
        step: str,
        iteration: int,
        position: int,
        *,
        key: str | None,
        method: str,
        url: str,
    ) -> None:
        """Before an unsafe request goes out: its key, durably (state 'sending')."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO steps (run_id, step, iteration, position, state, key, method, url, "
                "sends, updated) VALUES (?, ?, ?, ?, 'sending', ?, ?, ?, 1, ?) "
                "ON CONFLICT (run_id, step, iteration) DO UPDATE SET state = 'sending', "
                "key = excluded.key, method = excluded.method, url = excluded.url, "
                "sends = steps.sends + 1, updated = excluded.updated",
                (run_id, step, iteration, position, key, method, url, self._clock()),
            )

    def result(
        self,
        run_id: str,
        step: str,
        iteration: int,
        position: int,
        *,
        state: str,
        key: str | None,
        method: str,
        url: str,
        status: int | None,
        attempts: int,
        replayed: bool,
        elapsed: float,
        captures: dict[str, Any],
        body: Any,
        digest: str | None,
        redacted: bool,
        error: str | None,
    ) -> None:
        """A step's outcome (ran, replayed, failed or skipped)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO steps (run_id, step, iteration, position, state, key, method, url, "
                "status, attempts, replayed, elapsed, captures, body, digest, redacted, error, "
                "sends, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?) ON CONFLICT (run_id, step, iteration) DO UPDATE SET "
                "state = excluded.state, key = excluded.key, method = excluded.method, "
                "url = excluded.url, status = excluded.status, attempts = excluded.attempts, "
                "replayed = excluded.replayed, elapsed = excluded.elapsed, "
                "captures = excluded.captures, body = excluded.body, digest = excluded.digest, "
                "redacted = excluded.redacted, error = excluded.error, "
                "sends = max(steps.sends, excluded.sends), updated = excluded.updated",
                (
                    run_id,
                    step,
                    iteration,
                    position,
                    state,
                    key,
                    method,
                    url,
                    status,
                    attempts,
                    int(replayed),
                    elapsed,
                    json.dumps(captures),
                    json.dumps(body),
                    digest,
                    int(redacted),
                    error,
                    0 if state == "skipped" else 1,
                    self._clock(),
                ),
            )


_STEP_COLUMNS = (
    "run_id, step, iteration, position, state, key, method, url, status, attempts, replayed, "
    "elapsed, captures, body, digest, redacted, error, sends"
)


def _run(row: tuple[Any, ...]) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        chain=row[1],
        name=row[2],
        definition=row[3],
        inputs=row[4],
        input_values=json.loads(row[5]),
        state=row[6],
        exit_code=row[7],
        created=row[8],
        updated=row[9],
    )


def _step(row: tuple[Any, ...]) -> StepRecord:
    return StepRecord(
        run_id=row[0],
        step=row[1],
        iteration=row[2],
        position=row[3],
        state=row[4],
        key=row[5],
        method=row[6],
        url=row[7],
        status=row[8],
        attempts=row[9],
        replayed=bool(row[10]),
        elapsed=row[11],
        captures=json.loads(row[12]) if row[12] else {},
        body=json.loads(row[13]) if row[13] else None,
        digest=row[14],
        redacted=bool(row[15]),
        error=row[16],
        sends=row[17],
    )
