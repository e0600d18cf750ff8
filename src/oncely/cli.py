"""The ``oncely`` command: look into a store, clean it, and start the reference service.

    oncely inspect --store URL --tenant T --key K [--json]   # one key's record
    oncely stats   --store URL [--json]                      # records by state, oldest lease
    oncely purge   --store URL --expired [--batch N] [--pause S|auto]  # delete past retention
    oncely migrate --store URL                               # create tables and indexes now
    oncely serve | demo [flags]                              # the reference service (optional)
    oncely chain run|resume|show|list ...                    # API chains (oncely[chains])

Exit status: 0 done, 1 the operation failed (store unreachable, no such key), 2 usage (a bad
flag, a bad store URL). ``serve`` and ``demo`` come from the ``oncely.commands`` entry point
group, which the reference service (``oncely-payments``) declares; oncely never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib.metadata import entry_points
from typing import Any, cast

from ._errors import ConfigurationError, OncelyError, StoreUnavailable
from ._keys import storage_key
from .events import Inspectable
from .stores import Store, open_store
from .stores._rules import claimed_at
from .stores._stats import key_hash
from .stores.sqlite import SQLiteStore

__all__ = ["main"]

DEFAULT_STORE = os.environ.get("ONCELY_STORE", "sqlite:oncely.db")
COMMANDS_GROUP = "oncely.commands"
SERVICE_INSTALL = "pip install oncely-payments  (from a checkout: pip install -e services/payments)"

EPILOG = """\
examples:
  oncely inspect --store sqlite:oncely.db --tenant acme --key 8e03978e-40d5
  oncely inspect --store postgresql://127.0.0.1:5432/app --tenant acme --key K --json
  oncely stats --store redis://127.0.0.1:6379/0 --prefix oncely:
  oncely purge --store sqlite:oncely.db --expired --batch 500
  oncely purge --store postgresql://127.0.0.1:5432/app --expired --pause 0   (back to back)
  oncely migrate --store postgresql://127.0.0.1:5432/app --schema idem
  oncely serve --port 8000        oncely demo --intents 500 --keep

store URLs: memory:, sqlite:PATH, postgresql://..., redis://..., rediss://..., redis+cluster://...
(default: $ONCELY_STORE, else sqlite:oncely.db). Exit status: 0 ok, 1 failed, 2 usage.
Key hashes match those of the service's logs, metrics and dashboard when $ONCELY_HASH_SECRET
is the same here and there (without it each process hashes with a random key). The purge's
progress bar needs rich (pip install 'oncely[cli]'); without it, a line per batch.
"""


class Failed(Exception):
    """The operation failed (exit 1); the message says what to do."""


def _ago(seconds: float) -> str:
    return f"in {seconds:.1f} s" if seconds >= 0 else f"{-seconds:.1f} s ago"


def _decoded(data: str) -> Any:
    """A recovery point's data as the app gave it (oncely keeps it as JSON text)."""
    try:
        return json.loads(data)
    except ValueError:  # written by something else than oncely: shown as it is
        return data


def _when(at: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
    return f"{stamp} UTC ({_ago(at - now)})"


def _inspect(store: Store, args: argparse.Namespace) -> str:
    skey = storage_key(args.tenant, args.key, args.namespace)
    record = store.get(skey)
    if record is None:
        raise Failed(
            f"no record for key {args.key!r} of tenant {args.tenant!r}"
            + (f" in namespace {args.namespace!r}" if args.namespace else "")
            + ": check the tenant (as the middleware derives it) and --namespace, or the key "
            "was never sent, was released after an error, or was purged"
        )
    now = time.time()
    version, _, _ = record.fingerprint.partition(":")
    response = record.response
    # The current owner's claim (a takeover makes a new one); None for records of older versions.
    claimed = claimed_at(record.token) if record.state.value == "in_flight" else None
    shown: dict[str, Any] = {
        "storage_key": record.key,
        "key_hash": key_hash(record.key),
        "state": record.state.value,
        "fingerprint": record.fingerprint,
        "fingerprint_version": version,
        "attempt": record.attempt,
        "lease_until": record.lease_until,
        # Only a key in flight has a lease; a completed one's lease_until is history.
        "lease_left": record.lease_until - now if record.state.value == "in_flight" else None,
        "claimed_at": claimed,
        "owner_age": None if claimed is None else now - claimed,
        "expires_at": record.expires_at,
        "forget_at": record.forget_at,
        "recovery_points": [{"name": n, "data": _decoded(data)} for n, data in record.phases],
        "response": None
        if response is None
        else {
            "status": response.status,
            "headers": [list(h) for h in response.headers],
            "replayable": response.replayable,
            "bytes": len(response.body),
        },
    }
    if args.json:
        return json.dumps(shown, indent=2)
    lines = [
        f"key        {args.key}  (tenant {args.tenant}; storage key {record.key[:16]}…, "
        f"hash {shown['key_hash']})",
        f"state      {record.state.value}, attempt {record.attempt}",
        f"fingerprint {record.fingerprint[:24]}…  (version {version})",
    ]
    if record.state.value == "in_flight":
        lease = "expired: the next retry takes it over" if record.lease_until <= now else "held"
        lines.append(f"lease      until {_when(record.lease_until, now)}, {lease}")
        if claimed is not None:
            lines.append(
                f"owner      attempt {record.attempt}, holding it for {now - claimed:.1f} s "
                f"(claimed {_when(claimed, now)})"
            )
    else:
        lines.append(
            f"replayable until {_when(record.expires_at, now)}"
            + (", over: a tombstone (a repeat gets 410)" if record.expires_at <= now else "")
        )
    lines.append(f"forgotten  at {_when(record.forget_at, now)}")
    if record.phases:
        lines.append("recovery points:")
        lines += [f"  - {name}: {data[:80]}" for name, data in record.phases]
    else:
        lines.append("recovery points: none")
    if response is None:
        lines.append(
            "response   none kept" + (" (a tombstone)" if record.state.value == "completed" else "")
        )
    else:
        lines.append(
            f"response   {response.status}, {len(response.body)} bytes"
            + ("" if response.replayable else ", not replayable (too large)")
        )
        lines += [f"  {name}: {value}" for name, value in response.headers]
    return "\n".join(lines)


def _inspectable(store: Store, what: str) -> Inspectable:
    if not isinstance(store, Inspectable):
        raise Failed(f"{type(store).__name__} cannot count its records ({what} needs stats())")
    return store


def _stats(store: Store, args: argparse.Namespace) -> str:
    stats = _inspectable(store, "oncely stats").stats(limit=args.limit)
    if args.json:
        return json.dumps(asdict(stats), indent=2)
    lines = [
        f"in flight   {stats.in_flight}",
        f"completed   {stats.completed}   (replayable)",
        f"tombstones  {stats.tombstones}   (past their response expiry, fingerprint kept)",
        f"expired     {stats.expired}   (past retention: oncely purge --expired)",
    ]
    if stats.oldest_lease_left is not None:
        lines.append(f"oldest lease ends {_ago(stats.oldest_lease_left)}")
    ages = [k.age for k in stats.in_flight_keys if k.age is not None]
    if ages:
        lines.append(f"oldest lease claimed {max(ages):.1f} s ago (of the keys listed)")
    for k in stats.in_flight_keys:
        age = "" if k.age is None else f"  claimed {k.age:.1f} s ago"
        lines.append(f"  {k.key_hash}  attempt {k.attempt}{age}  lease ends {_ago(k.lease_left)}")
    return "\n".join(lines)


def _progress(total: int | None) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A progress bar (rich, when installed and on a terminal), else a line per batch."""
    if sys.stderr.isatty():
        try:
            from rich.progress import Progress
        except ImportError:
            pass
        else:
            bar = Progress(transient=True)
            task = bar.add_task("purging", total=total)
            bar.start()
            return (lambda done: bar.update(task, completed=done)), bar.stop
    of = f" of {total}" if total is not None else ""

    def plain(done: int) -> None:
        print(f"purged {done}{of}", file=sys.stderr)

    return plain, lambda: None


def _pause(text: str) -> float | None:
    """``--pause``: ``auto`` (None: as long as the batch took), else seconds, 0 or more."""
    if text == "auto":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"--pause takes auto or seconds (0 or more), not {text!r}")
    return seconds


def _purge(store: Store, args: argparse.Namespace) -> str:
    """Batches of ``--batch`` records, each its own short write, with a pause after each.

    A batch holds the store's write lock while it runs (SQLite has one writer), so batches sent
    back to back starve live traffic. By default each pause lasts as long as the batch before
    it took: the purge takes at most half of the store's write time, whatever the store's speed.
    """
    if not args.expired:
        raise ConfigurationError("purge deletes expired records only: say so with --expired")
    if args.batch is None:  # SQLite's one writer waits for a batch: keep its batches short
        args.batch = 200 if isinstance(store, SQLiteStore) else 1000
    if args.batch < 1:
        raise ConfigurationError(f"--batch must be 1 or more, not {args.batch}")
    total = store.stats(limit=0).expired if isinstance(store, Inspectable) else None
    update, stop = _progress(total)
    done = 0
    try:
        while True:
            began = time.monotonic()
            deleted = store.purge(limit=args.batch)
            took = time.monotonic() - began
            done += deleted
            update(done)
            if deleted < args.batch:
                break
            time.sleep(took if args.pause is None else args.pause)
    except KeyboardInterrupt:  # each batch commits on its own: what was purged stays purged
        print(f"oncely purge: stopped; purged {done} expired records", file=sys.stderr)
        raise
    finally:
        stop()
    return f"purged {done} expired records"


def _migrate(store: Store, args: argparse.Namespace) -> str:
    migrate = getattr(store, "migrate", None)
    if migrate is None:
        return "nothing to migrate: this store keeps no schema"
    migrate()
    return "schema is up to date"


ACTIONS: dict[str, Callable[[Store, argparse.Namespace], str]] = {
    "inspect": _inspect,
    "stats": _stats,
    "purge": _purge,
    "migrate": _migrate,
}


def _store_options(args: argparse.Namespace) -> dict[str, str]:
    return {n: v for n in ("schema", "table", "prefix") if (v := getattr(args, n, None))}


# The options each store takes; a store given another one is a usage error (exit 2).
_TAKES: dict[str, set[str]] = {
    "sqlite": {"table"},
    "postgres": {"schema", "table"},
    "redis": {"prefix"},
    "memory": set(),
}


def _run(args: argparse.Namespace) -> str:
    options = _store_options(args)
    scheme = args.store.split(":", 1)[0].lower()
    takes = next((t for name, t in _TAKES.items() if scheme.startswith(name)), None)
    if takes is not None and (wrong := sorted(set(options) - takes)):
        raise ConfigurationError(
            f"a {scheme}: store does not take --{wrong[0]}: --schema is for PostgreSQL, "
            "--table for SQLite and PostgreSQL, --prefix for Redis"
        )
    try:
        store = open_store(args.store, **options)
    except TypeError as exc:
        raise ConfigurationError(
            f"this store does not take that option ({exc}): --schema is for PostgreSQL, "
            "--table for SQLite and PostgreSQL, --prefix for Redis"
        ) from exc
    try:
        path = store.path if isinstance(store, SQLiteStore) else None
        if (
            path is not None
            and args.command != "migrate"
            and path != ":memory:"
            and not os.path.exists(path)
        ):  # opening it would make an empty one: a typo would read as "no such key"
            raise Failed(
                f"no SQLite file at {path!r}: check the path (a relative one starts in the "
                f"current directory); oncely migrate --store {args.store} makes one"
            )
        exists = getattr(store, "exists", None)  # PostgreSQL's, which creates nothing
        if args.command != "migrate" and exists is not None and not exists():
            # Opening the store would create them: a mistyped --schema would read as "no such key".
            where = f"{getattr(store, 'schema', '?')}.{getattr(store, 'table', '?')}"
            raise Failed(
                f"no oncely table {where} in this database: check --schema and --table; "
                f"oncely migrate --store URL makes it"
            )
        return ACTIONS[args.command](store, args)
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oncely",
        description="Look into an oncely store, clean it, and start the reference service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("inspect", "show the record of one idempotency key"),
        ("stats", "count records by state; the oldest leases in flight"),
        ("purge", "delete records past their retention, in batches"),
        ("migrate", "create the store's tables and indexes (idempotent)"),
    ):
        cmd = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_argument("--store", default=DEFAULT_STORE, help="store URL (env ONCELY_STORE)")
        cmd.add_argument("--schema", help="PostgreSQL schema of the records table")
        cmd.add_argument("--table", help="records table name (SQLite, PostgreSQL)")
        cmd.add_argument("--prefix", help="Redis key prefix")
        if name in ("inspect", "stats"):
            cmd.add_argument("--json", action="store_true", help="print JSON")
        if name == "stats":
            cmd.add_argument("--limit", type=int, default=20, help="in-flight keys to list")
        if name == "purge":
            cmd.add_argument("--expired", action="store_true", help="delete expired records")
            cmd.add_argument(
                "--batch", type=int, help="records per batch (default 200 on SQLite, else 1000)"
            )
            cmd.add_argument(
                "--pause",
                type=_pause,
                default=None,
                metavar="S|auto",
                help="seconds between batches, or auto (default): as long as the last batch "
                "took, so live traffic keeps at least half of the store's write time",
            )
        if name == "inspect":
            tenant = cmd.add_mutually_exclusive_group(required=True)
            tenant.add_argument("--tenant", help="the key's tenant, as the middleware has it")
            tenant.add_argument("--scope", dest="tenant", help=argparse.SUPPRESS)
            cmd.add_argument("--key", required=True, help="the Idempotency-Key value")
            cmd.add_argument("--namespace", default="", help="the middleware's namespace")
    for name, text in (
        ("serve", "run the reference payments service (oncely serve --help)"),
        ("demo", "the chaos demo of the reference service (oncely demo --help)"),
        ("chain", "run API chains once, resume them (oncely chain --help)"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _service_command(name: str, argv: list[str]) -> int:
    found = [ep for ep in entry_points(group=COMMANDS_GROUP) if ep.name == name]
    if not found:
        print(
            f"oncely {name} needs the reference service, which is not installed: {SERVICE_INSTALL}",
            file=sys.stderr,
        )
        return 1
    command = cast(Callable[[list[str]], int], found[0].load())
    return int(command(argv) or 0)


def _chain(argv: list[str]) -> int:
    try:
        chains = importlib.import_module("oncely.chains.cli")
    except ImportError as exc:
        print(
            f"oncely chain needs the chains extra ({exc}): pip install 'oncely[chains]'",
            file=sys.stderr,
        )
        return 2
    result: int = chains.main(argv)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] in (["serve"], ["demo"]):
        return _service_command(args_list[0], args_list[1:])
    if args_list[:1] == ["chain"]:
        return _chain(args_list[1:])
    args = _parser().parse_args(args_list)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # its retries: the error says it
    try:
        print(_run(args), flush=True)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (oncely stats | head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigurationError as exc:
        print(f"oncely {args.command}: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        hint = (
            "Check the path (its folder must exist) and that the file is a SQLite database."
            if args.store.lower().startswith("sqlite:")
            else "Check the store URL and that the server answers."
        )
        print(f"oncely {args.command}: {exc}\n{hint}", file=sys.stderr)
        return 1
    except (Failed, OncelyError) as exc:
        print(f"oncely {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
