"""Every decision oncely makes, as one typed event, and what a store can say about itself.

The core emits one :class:`Decision` per protected request or call (ASGI, WSGI, ``@idempotent``)
to the ``on_decision`` hooks a surface is given; metrics, logs, traces and the dashboard are
such hooks. An event carries no raw key, tenant, path, credential or body: the route is its
template, the key and tenant are short hashes.

Stores that can answer questions about what they hold implement :class:`Inspectable`
(``stats``), which ``oncely stats``, the in-flight gauge and the dashboard read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable

__all__ = [
    "OUTCOMES",
    "AsyncInspectable",
    "Decision",
    "DecisionHook",
    "InFlightKey",
    "Inspectable",
    "Outcome",
    "StoreOperation",
    "StoreStats",
    "Surface",
]

Outcome = Literal[
    "executed",  # the handler ran and its answer was kept (or is being written)
    "replayed",  # the stored answer was sent back; the handler did not run
    "in_flight",  # another request holds the key (409)
    "payload_mismatch",  # the key was used with another payload (422)
    "missing_key",  # the route requires a key and none was sent (400)
    "malformed_key",  # the key header is not a valid key, or came twice (400)
    "missing_tenant",  # the request does not say whose it is (400)
    "too_large",  # the request body is over the limit (413)
    "not_replayable",  # the answer kept was too large to replay (410)
    "store_unavailable",  # the store could not be reached (503), or the outcome not written
    "lease_lost",  # another claim took the key over while the handler ran
    "released_error",  # the handler failed (exception or error status) and the key was freed
]

#: Every outcome, in the order above (for bounded label sets and tables).
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

Surface = Literal["asgi", "wsgi", "function"]


@dataclass(frozen=True, slots=True)
class StoreOperation:
    """One store operation a decision waited on: "claim", "complete", "release" or
    "record_phase"; when it began (wall clock, ``time.time()``), how long it took, and whether
    the store failed it."""

    name: str
    started: float
    seconds: float
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision about one request (or one call of an ``@idempotent`` function)."""

    outcome: Outcome
    #: The route's template ("/payments/{id}"), or the function's prefix; never the raw path.
    route: str
    surface: Surface
    #: The store's kind: "memory", "sqlite", "postgresql", "redis", or a user store's class name.
    store: str
    method: str = ""
    #: The claim's attempt number (1 for the first run, 2 after a takeover); None before a claim.
    attempt: int | None = None
    #: The HTTP status the client got (None for a function call).
    status: int | None = None
    #: Seconds spent waiting on the store for this request, and in all.
    store_seconds: float = 0.0
    total_seconds: float = 0.0
    #: Bytes of the response kept or replayed; None when nothing was kept.
    response_size: int | None = None
    #: Short hashes (hex) of the storage key and the tenant; never the raw values.
    key_hash: str | None = None
    tenant_hash: str | None = None
    #: The store operations this decision waited on, in order (writes that go on in the
    #: background after the client was answered are not among them).
    operations: tuple[StoreOperation, ...] = ()


DecisionHook = Callable[[Decision], Awaitable[None] | None]
"""A hook called with every decision; sync or async. A hook that raises is counted and logged,
never raised into the request."""


@dataclass(frozen=True, slots=True)
class InFlightKey:
    """One key in flight: its storage key hashed, its attempt, how long it has been claimed and
    how long its lease has left (negative: expired, a retry will take it over)."""

    key_hash: str
    attempt: int
    lease_left: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store holds right now (times are seconds, on the store's clock)."""

    in_flight: int
    completed: int
    #: Records past their response's expiry whose fingerprint is still kept (tombstones).
    tombstones: int
    #: Records past ``forget_at``, waiting for ``purge``.
    expired: int
    #: The in-flight key whose lease ends first, expired or not: seconds left on it (None: none).
    oldest_lease_left: float | None = None
    #: Up to ``limit`` keys in flight, the oldest lease first.
    in_flight_keys: tuple[InFlightKey, ...] = field(default=())


@runtime_checkable
class Inspectable(Protocol):
    """A sync store that can count what it holds."""

    def stats(self, *, limit: int = 20) -> StoreStats: ...


@runtime_checkable
class AsyncInspectable(Protocol):
    """An async store that can count what it holds."""

    async def stats(self, *, limit: int = 20) -> StoreStats: ...
