"""The Redis backend of the contract suite: the real server, a key prefix of its own per run.

``ONCELY_REDIS_URL`` points it elsewhere, a Redis Cluster too (``redis+cluster://HOST:PORT``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from oncely.stores.redis import AsyncRedisStore, RedisStore

from ..conftest import service_missing

if TYPE_CHECKING:
    from .conftest import Backend

REDIS_URL = os.environ.get("ONCELY_REDIS_URL", "redis://127.0.0.1:6379/0")


async def delete_prefix(client: redis.asyncio.Redis | RedisCluster, prefix: str) -> None:
    """Delete every key under ``prefix`` (only those: never FLUSHDB)."""
    names = [name async for name in client.scan_iter(match=prefix + "*", count=1000)]
    for start in range(0, len(names), 500):
        await client.delete(*names[start : start + 500])


async def redis_store(prefix: str | None = None) -> AsyncRedisStore:
    """A store on the test server with a fresh prefix; skips (fails under CI) without a server."""
    scheme, _, rest = REDIS_URL.partition("://")
    probe = redis.asyncio.Redis.from_url(
        f"{scheme.removesuffix('+cluster')}://{rest}",
        socket_connect_timeout=1,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        await probe.ping()
    except (RedisError, OSError) as exc:
        where = urlsplit(REDIS_URL)  # host and port only: never the password
        service_missing(f"Redis not reachable at {where.hostname}:{where.port or 6379}: {exc}")
    finally:
        await probe.aclose()
    prefix = prefix or f"oncely-test:{secrets.token_hex(8)}:"
    return AsyncRedisStore.from_url(REDIS_URL, prefix=prefix)


async def redis_backend(tmp_path: Path, *, sync: bool) -> AsyncIterator[Backend]:
    """A store on a fresh prefix: the async side, or the sync side run in threads."""
    from .conftest import Backend, InThreads

    store = await redis_store()
    sync_store = RedisStore.from_url(REDIS_URL, prefix=store.prefix) if sync else None

    def advance(seconds: float) -> None:
        if sync_store is not None:
            sync_store.time_offset += seconds
        store.time_offset += seconds

    try:
        yield Backend("redis", store if sync_store is None else InThreads(sync_store), advance)
    finally:
        if sync_store is not None:
            sync_store.close()
        await delete_prefix(store.client, store.prefix)
        await store.aclose()
