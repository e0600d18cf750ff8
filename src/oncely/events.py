"""Every decision oncely makes, as one typed event, and what a store can say about itself.

The core emits one :class:`Decision` per protected request or call (ASGI, WSGI, ``@idempotent``)
to the ``on_decision`` hooks a surface is given; metrics, logs, traces and the dashboard are
such hooks. An event carries no raw key, tenant, path, credential or body: the route is its
template, the key and tenant are short hashes.

Stores that can answer questions about what they hold implement :class:`Inspectable`
(``stats``), which ``oncely stats``, the in-flight gauge and the dashboard read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable

from . import _keys

__all__ = [
    "DECISION_FIELDS",
    "OUTCOMES",
    "AsyncInspectable",
    "CountingHook",
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


def _frozen(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_del(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


class StoreOperation:
    """One store operation a decision waited on: "claim", "complete", "release" or
    "record_phase"; when it began (wall clock, ``time.time()``), how long it took, and whether
    the store failed it. Immutable."""

    __slots__ = ("failed", "name", "seconds", "started")
    __match_args__ = ("name", "started", "seconds", "failed")

    name: str
    started: float
    seconds: float
    failed: bool

    def __init__(self, name: str, started: float, seconds: float, failed: bool = False) -> None:
        _op_name(self, name)
        _op_started(self, started)
        _op_seconds(self, seconds)
        _op_failed(self, failed)

    __setattr__ = _frozen
    __delattr__ = _frozen_del

    def _fields(self) -> tuple[str, float, float, bool]:
        return (self.name, self.started, self.seconds, self.failed)

    def __eq__(self, other: object) -> bool:
        if type(other) is not StoreOperation:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"StoreOperation(name={self.name!r}, started={self.started!r}, "
            f"seconds={self.seconds!r}, failed={self.failed!r})"
        )

    def __reduce__(self) -> tuple[type[StoreOperation], tuple[str, float, float, bool]]:
        return (StoreOperation, self._fields())


_op_name = StoreOperation.__dict__["name"].__set__
_op_started = StoreOperation.__dict__["started"].__set__
_op_seconds = StoreOperation.__dict__["seconds"].__set__
_op_failed = StoreOperation.__dict__["failed"].__set__


def _read_hash(
    decision: Decision,
    found: str | None,
    raw: str | None,
    hash_of: Callable[[str], str],
    keep_hash: Callable[[Decision, str | None], None],
    keep_raw: Callable[[Decision, str | None], None],
) -> str | None:
    """A decision's hash, made from its raw value when first read (the raw value then let go)."""
    if found is None and raw is not None:
        found = hash_of(raw)
        keep_hash(decision, found)
        keep_raw(decision, None)
    return found


class Decision:
    """One decision about one request (or one call of an ``@idempotent`` function). Immutable.

    ``key_hash`` and ``tenant_hash`` of a decision the core emits are computed when first read
    (by a log line or a hook that wants them), so a decision nobody asks them of pays no hash;
    the event never shows, compares, copies or pickles anything but the hashes.
    """

    __slots__ = (
        "_key",
        "_key_hash",
        "_tenant",
        "_tenant_hash",
        "attempt",
        "method",
        "operations",
        "outcome",
        "response_size",
        "route",
        "status",
        "store",
        "store_seconds",
        "surface",
        "total_seconds",
    )
    __match_args__ = (
        "outcome",
        "route",
        "surface",
        "store",
        "method",
        "attempt",
        "status",
        "store_seconds",
        "total_seconds",
        "response_size",
        "key_hash",
        "tenant_hash",
        "operations",
    )

    outcome: Outcome
    #: The route's template ("/payments/{id}"), or the function's prefix; never the raw path.
    route: str
    surface: Surface
    #: The store's kind: "memory", "sqlite", "postgresql", "redis", or a user store's class name.
    store: str
    method: str
    #: The claim's attempt number (1 for the first run, 2 after a takeover); None before a claim.
    attempt: int | None
    #: The HTTP status the client got (None for a function call).
    status: int | None
    #: Seconds spent waiting on the store for this request, and in all.
    store_seconds: float
    total_seconds: float
    #: Bytes of the response kept or replayed; None when nothing was kept.
    response_size: int | None
    #: The store operations this decision waited on, in order (writes that go on in the
    #: background after the client was answered are not among them).
    operations: tuple[StoreOperation, ...]
    _key: str | None  # the storage key, until its hash is read (then None)
    _key_hash: str | None
    _tenant: str | None  # the tenant, until its hash is read (then None)
    _tenant_hash: str | None

    def __init__(
        self,
        outcome: Outcome,
        route: str,
        surface: Surface,
        store: str,
        method: str = "",
        attempt: int | None = None,
        status: int | None = None,
        store_seconds: float = 0.0,
        total_seconds: float = 0.0,
        response_size: int | None = None,
        key_hash: str | None = None,
        tenant_hash: str | None = None,
        operations: tuple[StoreOperation, ...] = (),
    ) -> None:
        _init_decision(
            self,
            outcome,
            route,
            surface,
            store,
            method,
            attempt,
            status,
            store_seconds,
            total_seconds,
            response_size,
            operations,
        )
        _d_key_hash(self, key_hash)
        _d_tenant_hash(self, tenant_hash)
        _d_key(self, None)
        _d_tenant(self, None)

    @classmethod
    def _hashing(
        cls,
        outcome: Outcome,
        route: str,
        surface: Surface,
        store: str,
        method: str,
        attempt: int | None,
        status: int | None,
        store_seconds: float,
        total_seconds: float,
        response_size: int | None,
        operations: tuple[StoreOperation, ...],
        storage_key: str | None,
        tenant: str | None,
    ) -> Decision:
        """The core's decision: its key and tenant hashed from ``storage_key`` and ``tenant``
        when first read."""
        self = _new(cls)
        _init_decision(
            self,
            outcome,
            route,
            surface,
            store,
            method,
            attempt,
            status,
            store_seconds,
            total_seconds,
            response_size,
            operations,
        )
        _d_key_hash(self, None)
        _d_tenant_hash(self, None)
        _d_key(self, storage_key)
        _d_tenant(self, tenant)
        return self

    @property
    def key_hash(self) -> str | None:
        """A short hash (hex) of the storage key; never the raw value. None: no key."""
        return _read_hash(self, self._key_hash, self._key, _key_hash, _d_key_hash, _d_key)

    @property
    def tenant_hash(self) -> str | None:
        """A short hash (hex) of the tenant; never the raw value. None: no tenant."""
        return _read_hash(
            self, self._tenant_hash, self._tenant, _tenant_hash, _d_tenant_hash, _d_tenant
        )

    __setattr__ = _frozen
    __delattr__ = _frozen_del

    def _fields(self) -> tuple[object, ...]:
        return (
            self.outcome,
            self.route,
            self.surface,
            self.store,
            self.method,
            self.attempt,
            self.status,
            self.store_seconds,
            self.total_seconds,
            self.response_size,
            self.key_hash,
            self.tenant_hash,
            self.operations,
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not Decision:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}" for name, value in zip(DECISION_FIELDS, self._fields(), strict=True)
        )
        return f"Decision({shown})"

    def __reduce__(self) -> tuple[type[Decision], tuple[object, ...]]:
        return (Decision, self._fields())


# The keyed hashes of oncely._keys (key_hash, tenant_hash), the key and personalisation taken
# in once: each hash copies that state instead of keying a new one. A process sees few tenants,
# so their hashes are kept (up to _TENANTS of them).
_KEY_STATE = hashlib.blake2b(key=_keys._SECRET, digest_size=8, person=b"oncely-key")
_TENANT_STATE = hashlib.blake2b(key=_keys._SECRET, digest_size=8, person=b"oncely-tenant")
_TENANTS = 1024
_tenant_hashes: dict[str, str] = {}


def _key_hash(storage_key: str) -> str:
    state = _KEY_STATE.copy()
    state.update(storage_key.encode("utf-8", "surrogatepass"))
    return state.hexdigest()


def _tenant_hash(tenant: str) -> str:
    found = _tenant_hashes.get(tenant)
    if found is None:
        state = _TENANT_STATE.copy()
        state.update(tenant.encode("utf-8", "surrogatepass"))
        found = state.hexdigest()
        if len(_tenant_hashes) >= _TENANTS:
            _tenant_hashes.clear()
        _tenant_hashes[tenant] = found
    return found


class CountingHook:
    """An ``on_decision`` hook that only counts decisions, as :class:`oncely.metrics.Metrics`.

    A subclass says how to count in :meth:`count`. Called with a :class:`Decision` (beside
    other hooks, or by hand), it counts what the decision says. Given alone to a surface, while
    the ``oncely.decisions`` log is not enabled for INFO, it is told the same things straight
    from the request as it is decided, and no Decision is built: what a request pays for its
    metrics is then little more than the count itself.
    """

    def count(
        self,
        outcome: Outcome,
        route: str,
        surface: Surface,
        store: str,
        size: int | None,
        operations: Sequence[tuple[str, float]],
    ) -> None:
        """One decision: its outcome, route template, surface and store kind; for
        ``executed`` the bytes of the answer kept (None when nothing was kept yet, and for any
        other outcome); and the name ("claim", "complete", "release", "record_phase") and
        seconds of each store operation it waited on, failed ones included."""
        raise NotImplementedError

    def __call__(self, decision: Decision) -> None:
        outcome = decision.outcome
        self.count(
            outcome,
            decision.route,
            decision.surface,
            decision.store,
            decision.response_size if outcome == "executed" else None,
            [(op.name, op.seconds) for op in decision.operations],
        )


_new = object.__new__
#: The public fields of a :class:`Decision`, in order (its constructor's arguments).
DECISION_FIELDS = Decision.__match_args__
_d_key = Decision.__dict__["_key"].__set__
_d_key_hash = Decision.__dict__["_key_hash"].__set__
_d_tenant = Decision.__dict__["_tenant"].__set__
_d_tenant_hash = Decision.__dict__["_tenant_hash"].__set__
_d_setters = tuple(
    Decision.__dict__[name].__set__
    for name in (
        "outcome",
        "route",
        "surface",
        "store",
        "method",
        "attempt",
        "status",
        "store_seconds",
        "total_seconds",
        "response_size",
        "operations",
    )
)
(
    _d_outcome,
    _d_route,
    _d_surface,
    _d_store,
    _d_method,
    _d_attempt,
    _d_status,
    _d_store_seconds,
    _d_total_seconds,
    _d_response_size,
    _d_operations,
) = _d_setters


def _init_decision(
    self: Decision,
    outcome: Outcome,
    route: str,
    surface: Surface,
    store: str,
    method: str,
    attempt: int | None,
    status: int | None,
    store_seconds: float,
    total_seconds: float,
    response_size: int | None,
    operations: tuple[StoreOperation, ...],
) -> None:
    _d_outcome(self, outcome)
    _d_route(self, route)
    _d_surface(self, surface)
    _d_store(self, store)
    _d_method(self, method)
    _d_attempt(self, attempt)
    _d_status(self, status)
    _d_store_seconds(self, store_seconds)
    _d_total_seconds(self, total_seconds)
    _d_response_size(self, response_size)
    _d_operations(self, operations)


DecisionHook = Callable[[Decision], Awaitable[None] | None]
"""A hook called with every decision; sync or async. A hook that raises is counted and logged,
never raised into the request."""


@dataclass(frozen=True, slots=True)
class InFlightKey:
    """One key in flight: its storage key hashed, its attempt, how long its lease has left
    (negative: expired, a retry will take it over) and its lease's age: how long ago its
    current owner claimed it (None for a claim made before claims carried their time)."""

    key_hash: str
    attempt: int
    lease_left: float
    age: float | None = None


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
