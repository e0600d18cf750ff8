"""oncely's client half: an httpx transport that keeps one key per operation and retries safely.

    import httpx
    from oncely.client import IdempotentTransport

    client = httpx.Client(base_url="https://api.example.com", transport=IdempotentTransport())
    r = client.post("/payments", json={"amount": 100, "currency": "USD", "customer": "cus_1"})
    r.extensions["oncely"]   # key, attempts, history, replayed, stopped

Needs the ``client`` extra (``pip install 'oncely[client]'``, which brings httpx).
"""

from __future__ import annotations

try:
    import httpx as _httpx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("oncely.client needs httpx: pip install 'oncely[client]'") from exc

from ._errors import BodyNotReplayable, KeyExpiredError, KeyReusedError, RetryLater
from ._flow import AttemptReport, Report, RetryEvent
from ._journal import JournalEntry, KeyJournal
from ._policy import SHARED_BUDGET, RetryBudget, RetryPolicy
from ._transport import AsyncIdempotentTransport, IdempotentTransport

__all__ = [
    "SHARED_BUDGET",
    "AsyncIdempotentTransport",
    "AttemptReport",
    "BodyNotReplayable",
    "IdempotentTransport",
    "JournalEntry",
    "KeyExpiredError",
    "KeyJournal",
    "KeyReusedError",
    "Report",
    "RetryBudget",
    "RetryEvent",
    "RetryLater",
    "RetryPolicy",
    "operation",
]


def operation(name: str) -> dict[str, dict[str, object]]:
    """``extensions=operation("order-42/pay")``: the request is that operation, one key for it."""
    return {"oncely": {"operation": name}}
