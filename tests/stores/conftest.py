"""The backends the contract suite runs against, each on both sides.

Each backend fixture yields a :class:`Backend`: a fresh, empty store and a way to move its clock.
The sync side of a backend runs the same test bodies through :class:`InThreads`, which calls
each blocking operation in a worker thread (so concurrent claims are concurrent threads).
Stores with a server clock (PostgreSQL, Redis) move it with an offset they add to the server's
time, so that tests never sleep there either. Each backend gets its own database objects or key
prefix and removes them afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from oncely.stores import AsyncStore, Store, open_store
from oncely.stores._over_sync import AsyncOverSync
from oncely.stores.memory import AsyncMemoryStore, MemoryStore
from oncely.stores.sqlite import AsyncSQLiteStore, SQLiteStore

from ..conftest import Clock
from .backend_postgres import postgres_backend
from .backend_redis import redis_backend

T = TypeVar("T")


class InThreads(AsyncOverSync[Store]):
    """A sync store's operations, each awaited in a worker thread: the async face the one
    contract suite drives. The store itself is ``.sync``."""

    in_process = False

    @classmethod
    def from_url(cls, url: str, /, **options: Any) -> InThreads:
        return cls(open_store(url, **options))

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass
class Backend:
    name: str
    store: AsyncStore
    advance: Callable[[float], None]


async def _memory(tmp_path: Path, *, sync: bool) -> AsyncIterator[Backend]:
    clock = Clock()
    store = InThreads(MemoryStore(clock=clock)) if sync else AsyncMemoryStore(clock=clock)
    yield Backend("memory", store, clock.advance)


async def _sqlite(tmp_path: Path, *, sync: bool) -> AsyncIterator[Backend]:
    clock = Clock()
    path = tmp_path / "contract.db"
    store = (
        InThreads(SQLiteStore(path, clock=clock)) if sync else AsyncSQLiteStore(path, clock=clock)
    )
    try:
        yield Backend("sqlite", store, clock.advance)
    finally:
        await store.aclose()


BACKENDS: dict[str, Callable[..., AsyncIterator[Backend]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": postgres_backend,
    "redis": redis_backend,
}
SIDES = ("async", "sync")


@pytest.fixture(params=[f"{name}-{side}" for name in sorted(BACKENDS) for side in SIDES])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name, _, side = request.param.partition("-")
    async for made in BACKENDS[name](tmp_path, sync=side == "sync"):
        yield made
