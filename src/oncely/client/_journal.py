"""The key journal: one key per named operation, kept across crashes of the client process.

Timeline of one operation (``order-42/pay``) with a journal::

    begin ──(fsync)──> attempt 1 ─ ─ ✗ crash ─ ─ restart: begin (same key) ──> attempt ──> finish
    written before anything is sent                reads the entry back           a final answer

``begin`` writes the operation's key and the digest of its request durably (SQLite, WAL,
``synchronous=FULL``) before the first attempt, so a process killed at any point after that
sends the same key when it sends the operation again. ``finish`` marks it done on a final
answer (a later send gets the server's replay). An entry older than the server's retention is
refused by the transport: the server may have forgotten the key, and a resend would run again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Self

__all__ = ["Journal", "JournalEntry", "KeyJournal", "MemoryJournal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS oncely_client_operations (
    operation TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    digest TEXT,
    created REAL NOT NULL,
    finished REAL,
    status INTEGER
)
"""
_COLUMNS = "operation, key, digest, created, finished, status"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One operation: its key, the digest of its request (None for an unbuffered stream),
    when it was begun and finished (seconds since the epoch), and the final status."""

    operation: str
    key: str
    digest: str | None
    created: float
    finished: float | None = None
    status: int | None = None


class Journal(Protocol):
    """What the transport needs from a journal (KeyJournal, or the in-memory default)."""

    def now(self) -> float: ...

    def begin(self, operation: str, key: str, digest: str | None) -> JournalEntry:
        """The operation's entry: the one written before, or a new one with ``key``."""
        ...

    def finish(self, operation: str, status: int) -> None: ...


class KeyJournal:
    """A SQLite file of operations and their keys (``KeyJournal("client.db")``).

    Safe to share between threads and processes (one row per operation, written in one
    transaction). ``clock`` is the wall clock (seconds since the epoch), for tests.
    """

    def __init__(
        self, path: str | os.PathLike[str] = "client.db", *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the entry is on disk before the request leaves, even if the machine loses power.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)

    def now(self) -> float:
        return self._clock()

    def begin(self, operation: str, key: str, digest: str | None) -> JournalEntry:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT INTO oncely_client_operations (operation, key, digest, created) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (operation) DO NOTHING",
                    (operation, key, digest, self._clock()),
                )
                row = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM oncely_client_operations WHERE operation = ?",
                    (operation,),
                ).fetchone()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return JournalEntry(*row)

    def finish(self, operation: str, status: int) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE oncely_client_operations SET finished = ?, status = ? WHERE operation = ?",
                (self._clock(), status, operation),
            )

    def get(self, operation: str) -> JournalEntry | None:
        """The entry of ``operation``, or None."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM oncely_client_operations WHERE operation = ?",
                (operation,),
            ).fetchone()
        return None if row is None else JournalEntry(*row)

    def forget(self, operation: str) -> bool:
        """Remove ``operation`` (its next send gets a new key); whether it was there."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM oncely_client_operations WHERE operation = ?", (operation,)
            )
        return cursor.rowcount > 0

    def purge(self, older_than: float) -> int:
        """Remove entries begun more than ``older_than`` seconds ago; how many went."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM oncely_client_operations WHERE created < ?",
                (self._clock() - older_than,),
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyJournal({str(self.path)!r})"


class MemoryJournal:
    """The journal when none is given: this process only, the last ``size`` operations."""

    def __init__(self, *, size: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._entries: OrderedDict[str, JournalEntry] = OrderedDict()
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._clock()

    def begin(self, operation: str, key: str, digest: str | None) -> JournalEntry:
        with self._lock:
            entry = self._entries.get(operation)
            if entry is None:
                entry = JournalEntry(operation, key, digest, self._clock())
                self._entries[operation] = entry
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(operation)
            return entry

    def finish(self, operation: str, status: int) -> None:
        with self._lock:
            entry = self._entries.get(operation)
            if entry is not None:
                self._entries[operation] = replace(entry, finished=self._clock(), status=status)
