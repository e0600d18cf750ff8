"""Settings from command-line flags, then environment variables, then defaults.

    oncely serve --store sqlite:payments.db --port 8000 --lease 10

| flag | environment variable | default |
|---|---|---|
| ``--store`` | ``ONCELY_PAYMENTS_STORE`` | ``sqlite:payments.db`` |
| ``--database`` | ``ONCELY_PAYMENTS_DATABASE`` | none: the ledger shares the store's database |
| ``--store-prefix`` | ``ONCELY_PAYMENTS_STORE_PREFIX`` | ``oncely-payments:`` (Redis only) |
| ``--host`` | ``ONCELY_PAYMENTS_HOST`` | ``127.0.0.1`` |
| ``--port`` | ``ONCELY_PAYMENTS_PORT`` | ``8000`` |
| ``--card-latency-ms`` | ``ONCELY_PAYMENTS_CARD_LATENCY_MS`` | ``10`` |
| ``--card-failure-rate`` | ``ONCELY_PAYMENTS_CARD_FAILURE_RATE`` | ``0`` |
| ``--card-network-db`` | ``ONCELY_PAYMENTS_CARD_NETWORK_DB`` | beside the ledger |
| ``--schema`` | ``ONCELY_PAYMENTS_SCHEMA`` | ``public`` (PostgreSQL only) |
| ``--ttl`` | ``ONCELY_PAYMENTS_TTL`` | ``86400`` (seconds) |
| ``--lease`` | ``ONCELY_PAYMENTS_LEASE`` | ``10`` (seconds) |
| ``--crash-at`` | ``ONCELY_PAYMENTS_CRASH_AT`` | none |
| ``--log-level`` | ``ONCELY_PAYMENTS_LOG_LEVEL`` | ``info`` |
| ``--demo-status`` | ``ONCELY_PAYMENTS_DEMO_STATUS`` | none (the demo's JSON file: audit panel) |

Without ``--database``, the store URL names the database of both oncely's records and the
ledger (payments, orders): they share it, so that a recovery point or a stored response commits
in the same transaction as the business write. ``sqlite:PATH`` (the default) or
``postgresql://...``; with PostgreSQL, ``schema`` names the schema that holds both the ledger's
tables and oncely's.

With ``--database`` the ledger lives there (``sqlite:PATH`` or ``postgresql://...``; ``schema``
then names the ledger's schema) and the store is any store URL, Redis included
(``redis://127.0.0.1:6379/0``, its keys under ``store_prefix``). The two never share a
transaction: the service then makes every ledger write idempotent by itself and records its
recovery points after each commit (see ledger.py, "A ledger apart from the store").
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["CRASH_POINTS", "ENV_PREFIX", "Settings", "parser"]

ENV_PREFIX = "ONCELY_PAYMENTS_"

# Where ``crash_at`` makes the process SIGKILL itself, once (see faults.py):
#   before_first_commit  inside the first phase's transaction, before COMMIT
#   during_charge        after the card network charged, before the second phase
#   after_charge_commit  after the second phase (charge and response) committed, before the
#                        response is sent
CRASH_POINTS = ("before_first_commit", "during_charge", "after_charge_commit")

_SQLITE = ("sqlite",)
_POSTGRES = ("postgresql", "postgres")
_REDIS = ("redis", "rediss", "redis+cluster", "rediss+cluster")


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:`` URL names, read as oncely reads it."""
    rest = url.split(":", 1)[1]
    if rest.startswith("//"):
        rest = rest[2:]  # sqlite:///abs/path.db -> /abs/path.db; sqlite://relative.db
    if not rest:
        raise ValueError("a sqlite: store URL needs a file, such as sqlite:payments.db")
    return Path(rest)


@dataclass(frozen=True, slots=True)
class Settings:
    """How one payments service process runs."""

    store: str = "sqlite:payments.db"
    database_url: str | None = None
    store_prefix: str = "oncely-payments:"
    host: str = "127.0.0.1"
    port: int = 8000
    card_latency_ms: float = 10.0
    card_failure_rate: float = 0.0
    card_network_db: str | None = None
    schema: str = "public"
    ttl: float = 24 * 3600.0
    lease: float = 10.0
    crash_at: str | None = None
    log_level: str = "info"
    demo_status: str | None = None

    def __post_init__(self) -> None:
        scheme = _scheme(self.store)
        if scheme not in _SQLITE + _POSTGRES + _REDIS:  # first: an unknown scheme is the error
            raise ValueError(
                f"store {self.store!r}: sqlite:PATH, postgresql://... or redis://HOST:PORT/DB"
            )
        if self.database_url is None and scheme not in _SQLITE + _POSTGRES:
            raise ValueError(
                f"store {self.store!r}: without --database the ledger shares the store's "
                "database, so the store must be SQL (sqlite:PATH or postgresql://...); give the "
                "ledger a database of its own with --database sqlite:PATH or postgresql://..."
            )
        if scheme in _SQLITE:
            sqlite_path(self.store)
        if self.database_url is not None:
            if _scheme(self.database_url) not in _SQLITE + _POSTGRES:
                raise ValueError(
                    f"database {self.database_url!r}: the ledger needs SQL: sqlite:PATH or "
                    "postgresql://..."
                )
            if _scheme(self.database_url) in _SQLITE:
                sqlite_path(self.database_url)
            if self.database_url == self.store:
                raise ValueError(
                    "--database names the store's own database: leave it out to share it"
                )
        if not self.store_prefix:
            raise ValueError("the store prefix must not be empty")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.schema):
            raise ValueError(f"schema {self.schema!r} must be a lower-case SQL identifier")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, not {self.port}")
        if self.card_latency_ms < 0:
            raise ValueError("card latency must be 0 ms or more")
        if not 0.0 <= self.card_failure_rate <= 1.0:
            raise ValueError("card failure rate must be between 0 and 1")
        if self.ttl <= 0 or self.lease <= 0:
            raise ValueError("ttl and lease must be positive (seconds)")
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ValueError(f"crash point must be one of {', '.join(CRASH_POINTS)}")

    @property
    def ledger_url(self) -> str:
        """The ledger's database: ``database_url``, or the store's own."""
        return self.store if self.database_url is None else self.database_url

    @property
    def shares_transaction(self) -> bool:
        """Whether oncely's records and the ledger commit in one transaction (no --database)."""
        return self.database_url is None

    @property
    def dialect(self) -> str:
        """The ledger's: ``sqlite`` or ``postgresql``."""
        return "sqlite" if _scheme(self.ledger_url) in _SQLITE else "postgresql"

    @property
    def store_dialect(self) -> str:
        """``sqlite``, ``postgresql`` or ``redis``."""
        scheme = _scheme(self.store)
        if scheme in _REDIS:
            return "redis"
        return "sqlite" if scheme in _SQLITE else "postgresql"

    @property
    def database(self) -> Path | None:
        """The ledger's SQLite file (the store's too, without --database); None for
        PostgreSQL."""
        return sqlite_path(self.ledger_url) if self.dialect == "sqlite" else None

    @property
    def state_dir(self) -> Path:
        """Where local files go: beside the SQLite database, or the working directory."""
        database = self.database
        return Path(".") if database is None else database.parent

    @property
    def state_name(self) -> str:
        database = self.database
        return "payments" if database is None else database.stem

    @property
    def card_network_path(self) -> Path:
        """The card network's own SQLite file (a foreign system: never the ledger's)."""
        if self.card_network_db:
            return Path(self.card_network_db)
        return self.state_dir / f"{self.state_name}-card-network.db"

    def crash_marker(self, point: str) -> Path:
        """The file that records that the crash at ``point`` has happened."""
        return self.state_dir / f"{self.state_name}.crashed-{point}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        return cls.from_args([], environ)

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Flags win over environment variables, which win over defaults."""
        env = os.environ if environ is None else environ
        p = parser()
        args = p.parse_args(argv)
        values: dict[str, Any] = {}
        for field in fields(cls):
            given = getattr(args, field.name)
            if given is None:
                variable = ENV_PREFIX + _FLAGS.get(field.name, field.name).upper()
                raw = env.get(variable)
                if raw is None or raw == "":
                    continue
                try:
                    given = _convert(field.name, raw)
                except ValueError:
                    p.error(f"{variable}={raw!r} is not valid")
            values[field.name] = given
        try:
            return cls(**values)
        except ValueError as exc:
            p.error(str(exc))


# Fields whose flag (and so environment variable) is named otherwise: --database names
# ``database_url`` (``database`` is the ledger's SQLite file).
_FLAGS = {"database_url": "database"}

_TYPES: dict[str, type] = {
    "port": int,
    "card_latency_ms": float,
    "card_failure_rate": float,
    "ttl": float,
    "lease": float,
}


def _convert(name: str, raw: str) -> Any:
    return _TYPES.get(name, str)(raw)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oncely serve",
        description="The oncely reference payments service (FastAPI; docs at /docs).",
        epilog="examples (python -m oncely_payments and oncely-payments take the same flags):\n"
        "  oncely serve --store sqlite:payments.db --port 8000\n"
        "  oncely serve --store postgresql://postgres@127.0.0.1:5432/app\n"
        "  oncely serve --store redis://127.0.0.1:6379/0 --database sqlite:l.db\n"
        "then http://127.0.0.1:8000/dashboard, /metrics and /docs.\n\n"
        f"Every flag may also be set as an environment variable {ENV_PREFIX}<FLAG>,\n"
        "for example ONCELY_PAYMENTS_STORE or ONCELY_PAYMENTS_PORT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--store",
        help="idempotency store, and the ledger's database unless --database: sqlite:PATH "
        "(default sqlite:payments.db), postgresql://USER@HOST:PORT/DB, or, with --database, "
        "redis://HOST:PORT/DB",
    )
    p.add_argument(
        "--database",
        dest="database_url",
        help="the ledger's own database, apart from the store: sqlite:PATH or "
        "postgresql://... (default: the store's database, in one transaction with it)",
    )
    p.add_argument("--store-prefix", help="the Redis store's key prefix (default oncely-payments:)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument(
        "--card-latency-ms", type=float, help="simulated card network latency (default 10)"
    )
    p.add_argument(
        "--card-failure-rate",
        type=float,
        help="share of card network calls that fail with 503, 0-1 (default 0)",
    )
    p.add_argument(
        "--card-network-db",
        help="the card network's own SQLite file (default: beside the ledger)",
    )
    p.add_argument(
        "--schema", help="PostgreSQL schema of the ledger and oncely's table (default public)"
    )
    p.add_argument("--ttl", type=float, help="seconds a response is replayed (default 86400)")
    p.add_argument("--lease", type=float, help="seconds a request holds its key (default 10)")
    p.add_argument(
        "--crash-at",
        choices=CRASH_POINTS,
        help="SIGKILL this process the first time a payment reaches this point (tests only)",
    )
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--demo-status",
        help="the demo's status file (JSON): adds the ledger audit panel to /dashboard",
    )
    return p
