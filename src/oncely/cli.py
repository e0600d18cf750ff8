"""The ``oncely`` command: operate a store, and start the reference service.

oncely migrate --store postgresql://127.0.0.1:5432/app   # create tables and indexes now
oncely purge --store sqlite:oncely.db                    # delete records past retention
oncely inspect --store URL --scope TENANT --key KEY      # show one key's record
oncely serve [service flags]                             # the reference payments service
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from ._errors import ConfigurationError, OncelyError
from ._keys import storage_key
from .stores import Store, open_store

__all__ = ["main"]

DEFAULT_STORE = os.environ.get("ONCELY_STORE", "sqlite:oncely.db")


def _migrate(store: Store) -> str:
    migrate = getattr(store, "migrate", None)
    if migrate is None:
        return "nothing to migrate: this store keeps no schema"
    migrate()
    return "schema is up to date"


def _purge(store: Store, batch: int) -> str:
    total = 0
    while True:
        deleted = store.purge(limit=batch)
        total += deleted
        if deleted < batch:
            return f"purged {total} expired records"


def _inspect(store: Store, scope: str, key: str, namespace: str) -> str:
    record = store.get(storage_key(scope, key, namespace))
    if record is None:
        return "no record for this key"
    response = record.response
    return json.dumps(
        {
            "storage_key": record.key,
            "state": record.state.value,
            "fingerprint": record.fingerprint,
            "attempt": record.attempt,
            "lease_until": record.lease_until,
            "expires_at": record.expires_at,
            "forget_at": record.forget_at,
            "phases": [name for name, _ in record.phases],
            "response": None
            if response is None
            else {
                "status": response.status,
                "replayable": response.replayable,
                "bytes": len(response.body),
            },
        },
        indent=2,
    )


def _store_options(args: argparse.Namespace) -> dict[str, str]:
    options = {}
    for name in ("schema", "table", "prefix"):
        value = getattr(args, name, None)
        if value:
            options[name] = value
    return options


def _with_store(url: str, action: str, args: argparse.Namespace) -> str:
    try:
        store = open_store(url, **_store_options(args))
    except TypeError as exc:
        raise ConfigurationError(f"this store does not take that option: {exc}") from exc
    try:
        if action == "migrate":
            return _migrate(store)
        if action == "purge":
            return _purge(store, args.batch)
        return _inspect(store, args.scope, args.key, args.namespace)
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oncely", description="Operate an oncely store, and start the reference service."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("migrate", "create the store's tables and indexes (idempotent)"),
        ("purge", "delete records past their retention, in batches"),
        ("inspect", "show the record of one idempotency key"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--store", default=DEFAULT_STORE, help="store URL (env ONCELY_STORE)")
        cmd.add_argument("--schema", help="PostgreSQL schema of the records table")
        cmd.add_argument("--table", help="records table name (SQLite, PostgreSQL)")
        cmd.add_argument("--prefix", help="Redis key prefix")
        if name == "purge":
            cmd.add_argument("--batch", type=int, default=1000, help="records per batch")
        if name == "inspect":
            cmd.add_argument("--scope", required=True, help="the tenant scope of the key")
            cmd.add_argument("--key", required=True, help="the Idempotency-Key value")
            cmd.add_argument("--namespace", default="", help="the middleware's namespace")
    sub.add_parser(
        "serve",
        help="run the reference payments service (flags: oncely serve --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        try:
            service = importlib.import_module("oncely_payments.__main__")
        except ImportError:
            print(
                "oncely serve needs the reference service: pip install -e services/payments",
                file=sys.stderr,
            )
            return 2
        result: int = service.main(args_list[1:])
        return result
    args = _parser().parse_args(args_list)
    try:
        print(_with_store(args.store, args.command, args))
    except (ConfigurationError, OncelyError) as exc:
        print(f"oncely {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
