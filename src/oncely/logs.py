"""A JSON log formatter with no dependency, for the ``oncely`` loggers.

    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter())
    logging.getLogger("oncely").addHandler(handler)
    logging.getLogger("oncely").setLevel(logging.INFO)    # one line per decision

Every field passed in ``extra=`` (a decision line's outcome, route, surface, store, method,
status, attempt, duration, store_duration, response_size, key_hash, tenant_hash) becomes a key
of the line's JSON object. With structlog, route stdlib records through
``structlog.stdlib.ProcessorFormatter`` with ``structlog.stdlib.ExtraAdder()`` among its
``foreign_pre_chain``: the same fields arrive as event keys.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

__all__ = ["JSONFormatter"]

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))
