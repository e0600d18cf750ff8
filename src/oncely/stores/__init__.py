"""Stores: where idempotency records live, opened from a URL, with a sync and an async side.

A store is a handful of atomic operations (see :class:`Store` and :class:`AsyncStore`, the same
operations blocking and awaited). Each is one round trip to the backend and returns values, not
exceptions: a claim either wins the key (:class:`Claimed`) or reads who has it
(:class:`Existing`), in the same operation, never check-then-set. Writes after a claim
(``complete``, ``release``, ``renew``, ``record_phase``) take effect only while the claim's token
still owns the key, so a process whose lease was taken over cannot touch the new owner's record
(fencing). ``stores/_rules.py`` states every rule once, in Python.

Backend trouble is raised as :class:`oncely.StoreUnavailable`, wrapping the driver's error.
A store whose operations never wait on anything unbounded says so with ``in_process = True``;
a driver then spares the timer it otherwise puts around each call (``store_timeout``).

    open_store("memory:")                                   # tests; one process
    open_store("sqlite:oncely.db")                          # the default; processes on one host
    open_store("postgresql://127.0.0.1:5432/test")          # oncely[postgres]
    open_store("redis://127.0.0.1:6379/0")                  # oncely[redis]
    open_async_store("sqlite:oncely.db")                    # the same stores, awaited

Every backend has both sides, with the names in pairs: ``MemoryStore``/``AsyncMemoryStore``,
``SQLiteStore``/``AsyncSQLiteStore``, ``PostgresStore``/``AsyncPostgresStore``,
``RedisStore``/``AsyncRedisStore``. Where the two sides are the same code modulo ``await``
(PostgreSQL on psycopg, Redis on redis-py) the async driver is the source and the sync one is
generated from it by ``scripts/unasync.py`` (``make test`` checks that they agree); where the
backend is in the process (memory, SQLite) the sync store is the implementation and the async
one runs it (on a worker thread for SQLite, whose file lock may wait).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from .._codec import Claimed, Existing, Record, StoredResponse
from .._errors import ConfigurationError

__all__ = ["AsyncStore", "Store", "open_async_store", "open_store"]


@runtime_checkable
class Store(Protocol):
    """The atomic operations every store provides, blocking; each is one round trip."""

    #: True when no operation waits on anything unbounded (no network): no timer is needed.
    in_process: bool

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> Store:
        """The store a URL names, with the store's own options."""
        ...

    def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        """Own ``key`` for ``lease`` seconds, or return the record that is there.

        Wins when the key is free, when its record is past ``forget_at``, or when it is in flight
        with an expired lease and the same fingerprint (a takeover: new token, attempt + 1, the
        recovery points kept).
        """
        ...

    def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        """Store the response for ``ttl`` seconds, the fingerprint for ``tombstone_ttl`` more.

        False, and nothing written, when ``claim`` no longer owns the key. Idempotent for its own
        token: completing again writes nothing and answers True, so a retry after a lost reply
        learns that its response is the one stored.
        """
        ...

    def release(self, claim: Claimed) -> bool:
        """Free the key so a retry runs again. False when ``claim`` no longer owns it."""
        ...

    def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (``name``, ``data`` JSON text) to the key ``claim`` owns.

        False, and nothing written, when ``claim`` no longer owns the key. Recovery points
        survive ``release`` and a takeover, and are handed to the next claim of the request.
        """
        ...

    def renew(self, claim: Claimed, *, lease: float) -> bool:
        """Extend the lease to now + ``lease``. False when ``claim`` no longer owns the key."""
        ...

    def get(self, key: str) -> Record | None:
        """The record under ``key``, as stored (for operators and tests)."""
        ...

    def purge(self, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` records past ``forget_at``; the count deleted."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncStore(Protocol):
    """The operations of :class:`Store`, awaited; each is one round trip."""

    #: True when no operation waits on anything unbounded (no network): no timer is needed.
    in_process: bool

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> AsyncStore:
        """The store a URL names, with the store's own options."""
        ...

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        """See :meth:`Store.claim`."""
        ...

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        """See :meth:`Store.complete`."""
        ...

    async def release(self, claim: Claimed) -> bool:
        """See :meth:`Store.release`."""
        ...

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """See :meth:`Store.record_phase`."""
        ...

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        """See :meth:`Store.renew`."""
        ...

    async def get(self, key: str) -> Record | None:
        """See :meth:`Store.get`."""
        ...

    async def purge(self, *, limit: int = 1000) -> int:
        """See :meth:`Store.purge`."""
        ...

    async def aclose(self) -> None: ...


_SCHEMES: dict[str, tuple[str, str, str, str]] = {
    # scheme: (module, sync class, async class, extra to install)
    "memory": ("oncely.stores.memory", "MemoryStore", "AsyncMemoryStore", ""),
    "sqlite": ("oncely.stores.sqlite", "SQLiteStore", "AsyncSQLiteStore", ""),
    "postgresql": ("oncely.stores.postgres", "PostgresStore", "AsyncPostgresStore", "postgres"),
    "postgres": ("oncely.stores.postgres", "PostgresStore", "AsyncPostgresStore", "postgres"),
    "redis": ("oncely.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss": ("oncely.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "redis+cluster": ("oncely.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss+cluster": ("oncely.stores.redis", "RedisStore", "AsyncRedisStore", "redis"),
}


def _store_class(url: str, *, sync: bool) -> Any:
    """The class for ``url``'s scheme, imported now. Unknown schemes and missing extras say
    what to do."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}:" for s in sorted(_SCHEMES))
        raise ConfigurationError(f"unknown store URL {url!r}: the known schemes are {known}")
    module_name, sync_class, async_class, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if not extra:
            raise
        raise ConfigurationError(
            f"the {scheme}: store needs its driver ({exc.name} is missing): "
            f"pip install 'oncely[{extra}]'"
        ) from exc
    return getattr(module, sync_class if sync else async_class)


def open_store(url: str, **options: Any) -> Store:
    """Open the sync side of the store a URL names (for WSGI apps, workers, scripts)."""
    store: Store = _store_class(url, sync=True).from_url(url, **options)
    return store


def open_async_store(url: str, **options: Any) -> AsyncStore:
    """Open the async side of the store a URL names (for ASGI apps and asyncio code)."""
    store: AsyncStore = _store_class(url, sync=False).from_url(url, **options)
    return store
