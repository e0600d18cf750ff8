"""The blocking counterparts of ``_async/_io.py``, name for name, for the generated drivers.

Threads need no help where asyncio does: a statement is never abandoned half-way by a caller
that stopped waiting (``promptly`` is the call itself).
"""

from __future__ import annotations

import threading
from typing import TypeVar

__all__ = ["Lock", "promptly"]

T = TypeVar("T")

Lock = threading.Lock


def promptly(result: T) -> T:
    """A blocking call has already finished when it gets here."""
    return result
