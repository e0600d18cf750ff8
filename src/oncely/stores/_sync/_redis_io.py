"""The blocking counterparts of ``_async/_redis_io.py``, name for name.

redis-py's own blocking pool hands out and takes back connections (``Connections`` lends from
it), and a sync cluster client learns its layout when it is made.
"""

from __future__ import annotations

from redis import Redis
from redis.cluster import RedisCluster
from redis.connection import Connection, ConnectionPool

__all__ = ["Connections", "cluster_ready", "drop"]


class Connections:
    """Connections to a standalone server, lent by the client's pool.

    With a :class:`redis.BlockingConnectionPool` (``from_url`` makes one), a caller waits up to
    the pool's ``timeout`` for a free connection at ``max_connections``; the pool also checks
    an idle connection before lending it.
    """

    def __init__(self, client: Redis) -> None:
        self._pool: ConnectionPool = client.connection_pool

    def take(self) -> Connection:
        conn: Connection = self._pool.get_connection()
        return conn

    def give_back(self, conn: Connection) -> None:
        self._pool.release(conn)

    def close(self) -> None:
        """Nothing of the store's own: the client's pool closes its connections."""


def cluster_ready(client: RedisCluster) -> None:
    """A sync cluster client learned its slot layout when it was made."""


def drop(conn: Connection) -> None:
    """Close a connection whose state is unknown."""
    conn.disconnect()
