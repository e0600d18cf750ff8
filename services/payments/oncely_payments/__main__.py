"""``python -m oncely_payments``: the payments service under uvicorn, in one process.

    python -m oncely_payments --store sqlite:payments.db --host 127.0.0.1 --port 8000 \
        --card-latency-ms 10 --card-failure-rate 0.1 --ttl 86400 --lease 10

See settings.py for every flag and its environment variable (ONCELY_PAYMENTS_STORE, ...).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Sequence

import uvicorn

from oncely import ConfigurationError

from .app import create_app
from .settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until it is stopped; the exit status (also for ``oncely serve``)."""
    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s")
    try:
        app = create_app(settings)
    except (ConfigurationError, OSError) as exc:
        print(f"oncely-payments: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # a SQLite path whose folder is missing, or not a database
        print(
            f"oncely-payments: the SQLite database cannot be opened ({exc}): check --store "
            "and --database (the folder must exist)",
            file=sys.stderr,
        )
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
