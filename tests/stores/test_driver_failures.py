"""Every failure of a store's client library is ``StoreUnavailable`` at the store's edge.

Each kind of failure is made for real, through a TCP proxy in front of the real PostgreSQL and
Redis (or on the store's own connections), under asyncio's event loop and under uvloop's (which
uvicorn uses whenever ``uvicorn[standard]`` is installed, and where a closed transport raises
``RuntimeError``): refused, reset, hung, garbled answers (a protocol error), a transport closed
under the driver, a pool with no connection to give. Every operation either works or raises
``StoreUnavailable``, never anything else; once the fault is gone, the store works again without
being reopened.

A hung server is bounded by the middleware's ``store_timeout`` (PostgreSQL's driver has no
client-side bound of its own); the test drives those operations through the same call.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import redis.asyncio
from redis.asyncio import BlockingConnectionPool

from oncely import Claimed, StoredResponse, StoreUnavailable
from oncely._drive import _call_store
from oncely.stores import AsyncStore
from oncely.stores.postgres import AsyncPostgresStore
from oncely.stores.redis import AsyncRedisStore

from ..realserver.proxy import Mode, StoreProxy
from . import backend_postgres, backend_redis

pytestmark = [pytest.mark.both_loops, pytest.mark.slow]

HUNG_LIMIT = 0.5  # the middleware's store_timeout in these tests
ENOUGH = 10.0  # no operation may take longer than this, whatever the fault
RESPONSE = StoredResponse(status=201, headers=(("content-type", "text/plain"),), body=b"ok")


@dataclass
class Proxied:
    """A store of the test's own on a real server, reached through ``proxy``."""

    kind: str
    store: AsyncStore
    proxy: StoreProxy
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


async def open_proxied(kind: str, stack: AsyncExitStack, *, tight_pool: bool) -> Proxied:
    """``tight_pool``: one connection at most, and a short wait for it."""
    if kind == "postgres":
        await backend_postgres.require_server()
        proxy = stack.enter_context(StoreProxy(("127.0.0.1", 5432)))
        schema = backend_postgres.new_schema()
        stack.push_async_callback(backend_postgres.drop_schema, schema)
        pg = AsyncPostgresStore(
            f"postgresql://postgres@127.0.0.1:{proxy.port}/test",
            schema=schema,
            connect_timeout=1,
            pool_timeout=0.3 if tight_pool else 1.0,
            min_size=0 if tight_pool else 1,
            max_size=1 if tight_pool else 4,
            prepare_threshold=None,
        )
        stack.push_async_callback(pg.aclose)
        return Proxied(kind, pg, proxy)
    probe = await backend_redis.redis_store()  # skips (fails under CI) without a server
    prefix = probe.prefix
    stack.push_async_callback(probe.aclose)
    stack.push_async_callback(backend_redis.delete_prefix, probe.client, prefix)
    proxy = stack.enter_context(StoreProxy(("127.0.0.1", 6379)))
    url = f"redis://127.0.0.1:{proxy.port}/0"
    timeouts: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    if tight_pool:
        pool = BlockingConnectionPool.from_url(url, max_connections=1, timeout=0.3, **timeouts)
        rs = AsyncRedisStore(redis.asyncio.Redis.from_pool(pool), prefix=prefix)
    else:
        rs = AsyncRedisStore.from_url(url, prefix=prefix, **timeouts)
    stack.push_async_callback(rs.aclose)
    return Proxied(kind, rs, proxy)


@pytest.fixture(params=["postgres", "redis"])
async def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as opened:
        yield opened


def key() -> str:
    return f"failure-{secrets.token_hex(8)}"


Operation = Callable[[AsyncStore, Claimed], Awaitable[object]]

OPERATIONS: dict[str, Operation] = {
    "claim": lambda store, _c: store.claim(key(), "fp", lease=30),
    "complete": lambda store, c: store.complete(c, RESPONSE, ttl=60, tombstone_ttl=60),
    "release": lambda store, c: store.release(c),
    "renew": lambda store, c: store.renew(c, lease=30),
    "record_phase": lambda store, c: store.record_phase(c, "phase", "{}"),
    "get": lambda store, c: store.get(c.key),
    "purge": lambda store, _c: store.purge(limit=10),
}


async def claimed(store: AsyncStore) -> Claimed:
    result = await store.claim(key(), "fp", lease=30)
    assert isinstance(result, Claimed)
    return result


async def each_operation(
    store: AsyncStore, claim: Claimed, *, limit: float | None = None
) -> dict[str, object]:
    """Every operation once: its result, or the StoreUnavailable it raised. Any other exception
    fails the test (it escapes)."""
    outcome: dict[str, object] = {}
    for name, operation in OPERATIONS.items():
        try:
            async with asyncio.timeout(ENOUGH):
                if limit is None:
                    outcome[name] = await operation(store, claim)
                else:
                    outcome[name] = await _call_store(operation(store, claim), limit)
        except StoreUnavailable as exc:
            outcome[name] = exc
    return outcome


def failed(outcome: dict[str, object]) -> list[str]:
    return [name for name, value in outcome.items() if isinstance(value, StoreUnavailable)]


async def works_again(store: AsyncStore, within: float = 20.0) -> None:
    """A fresh claim succeeds, without reopening the store. Connections found dead on the way
    cost failures first, and psycopg's pool reconnects on a backoff of its own."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await claimed(store)
            return
        except StoreUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_refused_server_is_store_unavailable(kind: str, stack: AsyncExitStack) -> None:
    proxied = await open_proxied(kind, stack, tight_pool=False)
    claim = await claimed(proxied.store)
    proxied.proxy.set_mode(Mode.REFUSE)
    outcome = await each_operation(proxied.store, claim)
    assert failed(outcome) == list(OPERATIONS), outcome
    proxied.proxy.set_mode(Mode.PASS)
    await works_again(proxied.store)


async def test_reset_connections_are_store_unavailable(kind: str, stack: AsyncExitStack) -> None:
    """Every live connection reset (a restart, a cut): what fails says so; the store goes on."""
    proxied = await open_proxied(kind, stack, tight_pool=False)
    claims = await asyncio.gather(*(claimed(proxied.store) for _ in range(4)))
    assert proxied.proxy.cut() >= 1
    for claim in claims:
        await each_operation(proxied.store, claim)
    await works_again(proxied.store)


async def test_garbled_answers_are_store_unavailable(kind: str, stack: AsyncExitStack) -> None:
    """Bytes of no protocol in the server's answers: a protocol error, not a crash."""
    proxied = await open_proxied(kind, stack, tight_pool=False)
    claim = await claimed(proxied.store)
    proxied.proxy.set_mode(Mode.GARBLE)
    outcome = await each_operation(proxied.store, claim)
    assert failed(outcome) == list(OPERATIONS), outcome
    proxied.proxy.set_mode(Mode.PASS)
    proxied.proxy.cut()  # the garbled connections are of no use to anyone
    await works_again(proxied.store)


async def test_a_hung_server_is_store_unavailable_within_the_store_timeout(
    kind: str, stack: AsyncExitStack
) -> None:
    proxied = await open_proxied(kind, stack, tight_pool=False)
    claim = await claimed(proxied.store)
    proxied.proxy.set_mode(Mode.HANG)
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await each_operation(proxied.store, claim, limit=HUNG_LIMIT)
    took = loop.time() - started
    assert failed(outcome) == list(OPERATIONS), outcome
    assert took < len(OPERATIONS) * (HUNG_LIMIT + 0.5)
    proxied.proxy.set_mode(Mode.PASS)
    await works_again(proxied.store)


async def close_transports(proxied: Proxied) -> int:
    """Close the store's idle connections under its driver, as a reset seen late does."""
    store = proxied.store
    if isinstance(store, AsyncRedisStore):
        connections = store._connections
        assert connections is not None
        idle = list(connections._idle)
        for idle_conn in idle:
            writer = idle_conn._writer
            assert writer is not None
            writer.transport.close()
        return len(idle)
    assert isinstance(store, AsyncPostgresStore)
    assert store._pool is not None
    conns: list[psycopg.AsyncConnection[Any]] = list(store._pool._pool)
    for pooled in conns:
        pooled.pgconn.finish()
    return len(conns)


async def test_a_transport_closed_under_the_driver_is_store_unavailable(
    kind: str, stack: AsyncExitStack
) -> None:
    """Under uvloop, redis-py meets ``RuntimeError: unable to perform operation on
    <TCPTransport closed=True>`` here; it must come out as StoreUnavailable like the rest."""
    proxied = await open_proxied(kind, stack, tight_pool=False)
    claims = await asyncio.gather(*(claimed(proxied.store) for _ in range(3)))
    assert await close_transports(proxied) >= 1
    for claim in claims:
        await each_operation(proxied.store, claim)
    await works_again(proxied.store)


async def test_a_pool_with_no_connection_to_give_is_store_unavailable(
    kind: str, stack: AsyncExitStack
) -> None:
    proxied = await open_proxied(kind, stack, tight_pool=True)
    claim = await claimed(proxied.store)
    store = proxied.store
    give_back: Callable[[], Awaitable[None]]
    if isinstance(store, AsyncRedisStore):
        assert store._connections is not None
        taken = await store._connections.take()

        async def give_back() -> None:
            assert store._connections is not None
            store._connections.give_back(taken)
    else:
        assert isinstance(store, AsyncPostgresStore)
        pool = store._pool
        assert pool is not None
        conn = await pool.getconn()

        async def give_back() -> None:
            await pool.putconn(conn)

    outcome = await each_operation(store, claim)
    # Every operation that needs a connection of the exhausted pool says so (Redis reads and
    # purges go through redis-py's own pool, and may still work).
    assert {"claim", "complete", "release", "renew", "record_phase"} <= set(failed(outcome))
    await give_back()
    await works_again(store)
