"""Stores: where idempotency records live, opened from a URL.

A store is a handful of atomic operations (see :class:`AsyncStore`). Each is one round trip to
the backend and returns values, not exceptions: a claim either wins the key (:class:`Claimed`)
or reads who has it (:class:`Existing`), in the same operation, never check-then-set.
Writes after a claim (``complete``, ``release``, ``renew``) take effect only while the claim's
token still owns the key, so a process whose lease was taken over cannot touch the new owner's
record (fencing).

Backend trouble is raised as :class:`oncely.StoreUnavailable`, wrapping the driver's error.
A store whose operations never wait on anything unbounded may say so with a class attribute
``in_process = True``; the middleware then spares the timer it otherwise puts around each call
(``store_timeout``).

    open_store("memory:")                                   # tests; one process
    open_store("sqlite:oncely.db")                          # the default; processes on one host
    open_store("postgresql://127.0.0.1:5432/test")          # oncely[postgres]
    open_store("redis://127.0.0.1:6379/0")                  # oncely[redis]
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from .._codec import Claimed, Existing, Record, StoredResponse
from .._errors import ConfigurationError

__all__ = ["AsyncStore", "open_store"]


@runtime_checkable
class AsyncStore(Protocol):
    """The atomic operations every store provides; each is one round trip."""

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        """Own ``key`` for ``lease`` seconds, or return the record that is there.

        Wins when the key is free, when its record is past ``forget_at``, or when it is in flight
        with an expired lease and the same fingerprint (a takeover: new token, attempt + 1, the
        recovery points kept).
        """
        ...

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        """Store the response for ``ttl`` seconds, the fingerprint for ``tombstone_ttl`` more.

        False, and nothing written, when ``claim`` no longer owns the key. Idempotent for its own
        token: completing again writes nothing and answers True, so a retry after a lost reply
        learns that its response is the one stored.
        """
        ...

    async def release(self, claim: Claimed) -> bool:
        """Free the key so a retry runs again. False when ``claim`` no longer owns it."""
        ...

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (``name``, ``data`` JSON text) to the key ``claim`` owns.

        False, and nothing written, when ``claim`` no longer owns the key. Recovery points
        survive ``release`` and a takeover, and are handed to the next claim of the request.
        """
        ...

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        """Extend the lease to now + ``lease``. False when ``claim`` no longer owns the key."""
        ...

    async def get(self, key: str) -> Record | None:
        """The record under ``key``, as stored (for operators and tests)."""
        ...

    async def purge(self, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` records past ``forget_at``; the count deleted."""
        ...

    async def aclose(self) -> None: ...


_SCHEMES: dict[str, tuple[str, str]] = {
    # scheme: ("module:Class", extra to install)
    "memory": ("oncely.stores.memory:MemoryStore", ""),
    "sqlite": ("oncely.stores.sqlite:SQLiteStore", ""),
    "postgresql": ("oncely.stores.postgres:PostgresStore", "postgres"),
    "postgres": ("oncely.stores.postgres:PostgresStore", "postgres"),
    "redis": ("oncely.stores.redis:RedisStore", "redis"),
    "rediss": ("oncely.stores.redis:RedisStore", "redis"),
    "redis+cluster": ("oncely.stores.redis:RedisStore", "redis"),
    "rediss+cluster": ("oncely.stores.redis:RedisStore", "redis"),
}


def open_store(url: str, **options: Any) -> AsyncStore:
    """Open the store a URL names. Unknown schemes and missing extras say what to do."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}:" for s in sorted(_SCHEMES))
        raise ConfigurationError(f"unknown store URL {url!r}: the known schemes are {known}")
    target, extra = _SCHEMES[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if not extra:
            raise
        raise ConfigurationError(
            f"the {scheme}: store needs its driver ({exc.name} is missing): "
            f"pip install 'oncely[{extra}]'"
        ) from exc
    cls = getattr(module, class_name)
    store: AsyncStore = cls.from_url(url, **options)
    return store
