"""The PostgreSQL backend of the contract suite: a real server, a schema of its own per test.

The server is the one at 127.0.0.1:5432 (database ``test``, user ``postgres``). Each test gets a
schema ``oncely_test_<random hex>``, dropped with everything in it afterwards. Time moves with
the store's ``time_offset``, added to the server's clock.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from oncely.stores.postgres import AsyncPostgresStore, PostgresStore

from ..conftest import service_missing

if TYPE_CHECKING:
    from .conftest import Backend

URL = "postgresql://postgres@127.0.0.1:5432/test"


async def require_server() -> None:
    """Skip (fail under ONCELY_REQUIRE_SERVICES=1) when the server does not answer."""
    try:
        conn = await psycopg.AsyncConnection.connect(URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    else:
        await conn.close()


def new_schema() -> str:
    return f"oncely_test_{secrets.token_hex(6)}"


async def drop_schema(schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )


@asynccontextmanager
async def scratch_schema() -> AsyncIterator[str]:
    """A schema name no one uses yet; the schema, if made, is dropped on the way out."""
    await require_server()
    schema = new_schema()
    try:
        yield schema
    finally:
        await drop_schema(schema)


@asynccontextmanager
async def postgres_store(schema: str, **options: Any) -> AsyncIterator[AsyncPostgresStore]:
    store = AsyncPostgresStore.from_url(URL, schema=schema, **options)
    try:
        yield store
    finally:
        await store.aclose()


async def postgres_backend(tmp_path: Path, *, sync: bool) -> AsyncIterator[Backend]:
    """A store on a fresh schema: the async side, or the sync side run in threads."""
    from .conftest import Backend, InThreads

    async with scratch_schema() as schema:
        store: AsyncPostgresStore | PostgresStore
        if sync:
            store = PostgresStore.from_url(URL, schema=schema)
        else:
            store = AsyncPostgresStore.from_url(URL, schema=schema)

        def advance(seconds: float) -> None:
            store.time_offset += seconds

        if isinstance(store, PostgresStore):
            try:
                yield Backend("postgres", InThreads(store), advance)
            finally:
                store.close()
        else:
            try:
                yield Backend("postgres", store, advance)
            finally:
                await store.aclose()
