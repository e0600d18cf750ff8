"""The backends the contract suite runs against.

Each backend fixture yields a :class:`Backend`: a fresh, empty store and a way to move its clock.
Stores with a server clock (PostgreSQL, Redis) move it with an offset they add to the server's
time, so that tests never sleep there either. Each backend gets its own database objects or key
prefix and removes them afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from oncely.stores import AsyncStore
from oncely.stores.memory import AsyncMemoryStore
from oncely.stores.sqlite import AsyncSQLiteStore

from ..conftest import Clock
from .backend_postgres import postgres_backend
from .backend_redis import redis_backend


@dataclass
class Backend:
    name: str
    store: AsyncStore
    advance: Callable[[float], None]


async def _memory(tmp_path: Path) -> AsyncIterator[Backend]:
    clock = Clock()
    yield Backend("memory", AsyncMemoryStore(clock=clock), clock.advance)


async def _sqlite(tmp_path: Path) -> AsyncIterator[Backend]:
    clock = Clock()
    store = AsyncSQLiteStore(tmp_path / "contract.db", clock=clock)
    try:
        yield Backend("sqlite", store, clock.advance)
    finally:
        await store.aclose()


BACKENDS: dict[str, Callable[[Path], AsyncIterator[Backend]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": postgres_backend,
    "redis": redis_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    factory = BACKENDS[request.param]
    async for made in factory(tmp_path):
        yield made
