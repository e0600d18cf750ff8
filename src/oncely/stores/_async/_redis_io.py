"""What the async Redis driver needs of redis-py's asyncio side, beside the code it shares
with the sync one. ``_sync/_redis_io.py`` is its hand-written blocking counterpart.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError

__all__ = ["Connections", "cluster_ready", "drop"]


class Connections:
    """The store's own connections to a standalone server, made by the client's pool.

    Idle ones are reused last in, first out. At the pool's ``max_connections`` a caller waits for
    one to come back, up to the pool's ``timeout`` (a :class:`BlockingConnectionPool`'s; none
    otherwise). A connection is handed back after every command, whatever happened: redis-py
    closes it on any failure, and it connects again on its next use.
    """

    def __init__(self, client: Redis) -> None:
        pool = client.connection_pool
        self._make: Callable[[], AbstractConnection] = pool.make_connection
        self._limit: int = pool.max_connections
        self._timeout: float | None = getattr(pool, "timeout", None)
        self._idle: list[AbstractConnection] = []
        self._all: list[AbstractConnection] = []
        self._waiters: deque[asyncio.Future[AbstractConnection]] = deque()

    async def take(self) -> AbstractConnection:
        if self._idle:
            conn = self._idle.pop()
            try:
                # Dropped by the server while idle, or left with unread data: start afresh.
                if conn.is_connected and await self._dirty(conn):
                    await conn.disconnect()
            except BaseException:
                self.give_back(conn)
                raise
            return conn
        if len(self._all) < self._limit:
            made = self._make()
            self._all.append(made)
            return made
        waiter: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.give_back(waiter.result())  # handed one just as the wait ended
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise ConnectionError("No connection available.") from None
            raise

    @staticmethod
    async def _dirty(conn: AbstractConnection) -> bool:
        can_read = getattr(conn, "can_read", None) or conn.can_read_destructive
        try:
            return bool(await can_read())
        except Exception:  # a reset, a closed transport (RuntimeError under uvloop), ...
            return True

    def give_back(self, conn: AbstractConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    async def close(self) -> None:
        conns, self._all, self._idle = self._all, [], []
        for conn in conns:
            await conn.disconnect()


async def cluster_ready(client: RedisCluster) -> None:
    """Learn a cluster's slot layout (at once, without I/O, once it is known)."""
    await client.initialize()


async def drop(conn: AbstractConnection) -> None:
    """Close a connection whose state is unknown, without waiting for the peer."""
    await conn.disconnect(nowait=True)
