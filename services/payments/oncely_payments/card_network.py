"""A simulated card network: a foreign system with its own memory of every charge.

It keeps its records in its OWN SQLite file, committed on its own: like a real card network,
its state does not roll back with ours. Every charge is made under the caller's idempotency key
(oncely's ``attempt.downstream_key("charge")``); a repeated call with the same key answers the
first charge's result and never charges twice.

Behaviour, in order, for ``charge(key, ...)``:

1. wait ``latency_ms``;
2. customers whose id starts with ``cus_flaky`` fail with :class:`CardNetworkUnavailable` on the
   first call for each key (nothing charged), and go through on the next;
3. with probability ``failure_rate`` the call fails with :class:`CardNetworkUnavailable`: half of
   these fail before anything happens, half after the charge was made (the answer was lost on
   the way back, as a timeout would lose it) -- a retry with the same key learns the result;
4. a known key answers its recorded result; a new one is declined for customers whose id starts
   with ``cus_decline``, approved otherwise, and recorded.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CardNetwork",
    "CardNetworkError",
    "CardNetworkUnavailable",
    "Charge",
]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS charges (
        idempotency_key TEXT PRIMARY KEY,
        id              TEXT NOT NULL UNIQUE,
        amount          INTEGER NOT NULL,
        currency        TEXT NOT NULL,
        customer        TEXT NOT NULL,
        outcome         TEXT NOT NULL,     -- approved | declined
        created         REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS calls (
        idempotency_key TEXT PRIMARY KEY,
        calls           INTEGER NOT NULL
    )""",
)


class CardNetworkError(Exception):
    """The network refused the call (the same key with other charge details)."""


class CardNetworkUnavailable(CardNetworkError):
    """The call failed or its answer was lost; retry with the same key."""


@dataclass(frozen=True, slots=True)
class Charge:
    id: str
    outcome: str  # approved | declined

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"


class CardNetwork:
    def __init__(
        self,
        path: Path,
        *,
        latency_ms: float = 10.0,
        failure_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.path = path
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="card-network")
        self._conn = sqlite3.connect(
            path, isolation_level=None, timeout=30.0, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA busy_timeout = 30000")
        for statement in _SCHEMA:
            self._conn.execute(statement)

    async def charge(self, key: str, *, amount: int, currency: str, customer: str) -> Charge:
        """Charge ``amount`` once per ``key``; see the module docstring."""
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        with self._rng_lock:
            roll = self.rng.random()
            lose_answer = self.rng.random() < 0.5
        fail = roll < self.failure_rate
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._charge, key, amount, currency, customer, fail, lose_answer
        )

    def _charge(
        self,
        key: str,
        amount: int,
        currency: str,
        customer: str,
        fail: bool,
        lose_answer: bool,
    ) -> Charge:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            (calls,) = conn.execute(
                "INSERT INTO calls VALUES (?, 1) ON CONFLICT (idempotency_key) "
                "DO UPDATE SET calls = calls + 1 RETURNING calls",
                (key,),
            ).fetchone()
            if customer.startswith("cus_flaky") and calls == 1:
                conn.execute("COMMIT")
                raise CardNetworkUnavailable("the card network timed out (first try)")
            if fail and not lose_answer:
                conn.execute("COMMIT")
                raise CardNetworkUnavailable("the card network is unavailable")
            charge = self._charge_once(conn, key, amount, currency, customer)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if fail:
            raise CardNetworkUnavailable("the card network's answer was lost")
        return charge

    @staticmethod
    def _charge_once(
        conn: sqlite3.Connection, key: str, amount: int, currency: str, customer: str
    ) -> Charge:
        row = conn.execute(
            "SELECT id, outcome, amount, currency, customer FROM charges WHERE idempotency_key = ?",
            (key,),
        ).fetchone()
        if row is not None:
            if tuple(row[2:]) != (amount, currency, customer):
                raise CardNetworkError(
                    "this idempotency key was used for another charge: "
                    f"{row[2]} {row[3]} for {row[4]}"
                )
            return Charge(row[0], row[1])
        outcome = "declined" if customer.startswith("cus_decline") else "approved"
        charge = Charge(f"ch_{uuid.uuid4().hex[:24]}", outcome)
        conn.execute(
            "INSERT INTO charges VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, charge.id, amount, currency, customer, outcome, time.time()),
        )
        return charge

    def charges(self) -> list[tuple[str, str, int, str, str, str]]:
        """Every charge: (idempotency_key, id, amount, currency, customer, outcome)."""
        conn = sqlite3.connect(self.path, timeout=30.0)
        try:
            rows = conn.execute(
                "SELECT idempotency_key, id, amount, currency, customer, outcome FROM charges"
            ).fetchall()
        finally:
            conn.close()
        return [tuple(row) for row in rows]

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)
        self._conn.close()
