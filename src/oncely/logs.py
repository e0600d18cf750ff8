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


_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, every ``extra`` field, and
    ``exception`` and ``stack`` when the record carries a traceback or ``stack_info``."""

    _day: tuple[int, str] = (-1, "")  # a second, and its isoformat() less "+00:00"

    def _time(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat()``, its date and time of day made
        once a second."""
        second = int(created // 1)
        micro = round((created - second) * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        known, prefix = self._day
        if second != known:
            prefix = datetime.fromtimestamp(second, UTC).isoformat()[:-6]
            self._day = (second, prefix)  # one assignment: threads see a matching pair
        if micro:
            return f"{prefix}.{micro:06d}+00:00"
        return f"{prefix}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        standard = _STANDARD
        for name, value in record.__dict__.items():
            if name not in standard and name[:1] != "_":
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(line)
