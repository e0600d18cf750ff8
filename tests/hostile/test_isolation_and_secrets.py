"""Through the real middleware, on every store backend: the same key under two tenants (even
tenants crafted so that tenant+key concatenations collide) never replays or blocks across
tenants, and no raw key, Authorization or Cookie value appears anywhere in a store's contents."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from oncely import AsyncStore, tenant_from_header
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import AsyncMemoryStore, MemoryStore
from oncely.stores.sqlite import AsyncSQLiteStore
from oncely.wsgi import IdempotencyMiddleware as WSGIMiddleware

from .test_asgi_hostile import _exchange

Message = MutableMapping[str, Any]

# (tenant, key) pairs that share the same concatenation "ten-a:key-b:key-c" and the same key.
# The keys are long and not hex, so that no random token or hash in a store can contain them.
PAIRS = [
    ("ten-a", "key-b:key-c"),
    ("ten-a:key-b", "key-c"),
    ("t1", "same-key"),
    ("t2", "same-key"),
]


@asynccontextmanager
async def _backend(name: str, tmp_path: Path) -> AsyncIterator[tuple[AsyncStore, Any]]:
    """A fresh store and an async function giving every byte it holds."""
    if name == "memory":
        mem = AsyncMemoryStore()

        async def dump_memory() -> bytes:
            return repr(mem.sync._records).encode()

        yield mem, dump_memory
    elif name == "sqlite":
        lite = AsyncSQLiteStore.from_url(f"sqlite:///{tmp_path / 'h.db'}")

        async def dump_sqlite() -> bytes:
            files = await asyncio.to_thread(lambda: sorted(tmp_path.iterdir()))
            return b"".join(p.read_bytes() for p in files if p.is_file())

        try:
            yield lite, dump_sqlite
        finally:
            await lite.aclose()
    elif name == "postgres":
        import psycopg
        from psycopg import sql

        from ..stores.backend_postgres import URL, postgres_store, scratch_schema

        async with scratch_schema() as schema, postgres_store(schema) as pg:

            async def dump_postgres() -> bytes:
                out = []
                async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
                    tables = await conn.execute(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema=%s",
                        (schema,),
                    )
                    for (table,) in await tables.fetchall():
                        rows = await conn.execute(
                            sql.SQL("SELECT t::text FROM {}.{} t").format(
                                sql.Identifier(schema), sql.Identifier(table)
                            )
                        )
                        out += [r[0].encode() for r in await rows.fetchall()]
                assert out, "no rows written"
                return b"\n".join(out)

            yield pg, dump_postgres
    else:
        import redis.asyncio

        from ..stores.backend_redis import REDIS_URL, delete_prefix, redis_store

        prefix = f"oncely-hostile2-{secrets.token_hex(6)}:"
        rs = await redis_store(prefix)
        client = redis.asyncio.Redis.from_url(REDIS_URL.replace("+cluster", ""))

        async def dump_redis() -> bytes:
            out: list[Any] = []
            async for name_ in client.scan_iter(match=prefix + "*"):
                out.append(name_)
                kind_: Any = await client.type(name_)
                kind = kind_.decode()
                if kind == "hash":
                    for k, v in (await client.hgetall(name_)).items():
                        out += [k, v]
                elif kind == "string":
                    out.append(await client.get(name_))
                elif kind == "list":
                    out += await client.lrange(name_, 0, -1)
                elif kind == "zset":
                    out += await client.zrange(name_, 0, -1)
                else:
                    out.append(repr(await client.dump(name_)).encode())
            assert out, "no keys written"
            return b"\n".join(out)

        try:
            yield rs, dump_redis
        finally:
            await delete_prefix(client, prefix)
            await client.aclose()
            await rs.aclose()


def _seen(value: bytes, raw: bytes) -> bool:
    """Whether ``value`` is in ``raw`` as it is or hex-encoded (PostgreSQL shows bytea so)."""
    return value in raw or value.hex().encode() in raw.lower()


def _headers(tenant: str, key: str, secret: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"idempotency-key", key.encode()),
        (b"x-tenant", tenant.encode()),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer AUTH-{secret}".encode()),
        (b"cookie", f"session=COOKIE-{secret}".encode()),
    ]


@pytest.mark.parametrize("name", ["memory", "sqlite", "postgres", "redis"])
def test_tenants_never_share_a_key_and_no_secret_is_stored(name: str, tmp_path: Path) -> None:
    secret = secrets.token_hex(12)
    raw_key = f"KEY-{secret}"
    runs: list[bytes] = []
    nested: list[int] = []

    async def main() -> None:
        async with _backend(name, tmp_path) as (store, dump):

            async def app(scope: Message, receive: Any, send: Any) -> None:
                tenant = dict(scope["headers"])[b"x-tenant"]
                runs.append(tenant)
                if tenant == b"block-a":
                    # while this key is in flight for one tenant, the other tenant is not blocked
                    inner = await _exchange(
                        mw, "POST", _headers("block-b", raw_key, secret), [b'{"n":1}'], False
                    )
                    nested.append(inner[0]["status"])
                await send({"type": "http.response.start", "status": 201, "headers": []})
                await send({"type": "http.response.body", "body": b'{"ok":true}'})

            mw = IdempotencyMiddleware(app, tenant=tenant_from_header("X-Tenant"), store=store)
            for tenant, key in [*PAIRS, ("block-a", raw_key)]:
                for body in (b'{"n":1}', b'{"n":1}'):
                    sent = await _exchange(mw, "POST", _headers(tenant, key, secret), [body], False)
                    assert sent[0]["status"] == 201, (tenant, key, sent)
            # each tenant ran once (the repeat replayed), and no tenant's record answered another
            assert sorted(runs) == sorted(
                {t.encode() for t, _ in PAIRS} | {b"block-a", b"block-b"}
            ), runs
            assert nested == [201]
            # a different body under the same key is a conflict only within its own tenant
            conflict = await _exchange(
                mw, "POST", _headers("t1", "same-key", secret), [b"{}"], False
            )
            assert conflict[0]["status"] == 422
            fresh = await _exchange(mw, "POST", _headers("t3", "same-key", secret), [b"{}"], False)
            assert fresh[0]["status"] == 201
            raw = await dump()
            assert _seen(b'{"ok":true}', raw)  # the scan sees the stored responses
            for value in (raw_key, f"AUTH-{secret}", f"COOKIE-{secret}", secret):
                assert not _seen(value.encode(), raw), (name, value)
            assert not _seen(b"same-key", raw)
            assert not _seen(b"key-b:key-c", raw)

    asyncio.run(main())


def test_wsgi_tenants_never_share_a_key() -> None:
    runs: list[str] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        runs.append(environ["HTTP_X_TENANT"])
        start_response("201 Created", [("Content-Type", "application/json")])
        return [b"{}"]

    store = MemoryStore()
    mw = WSGIMiddleware(app, tenant=tenant_from_header("X-Tenant"), store=store)
    statuses: list[str] = []

    def start_response(status: str, headers: object, exc_info: object = None) -> Any:
        statuses.append(status)
        return lambda _: None

    for tenant, key in PAIRS * 2:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/p",
            "CONTENT_LENGTH": "2",
            "CONTENT_TYPE": "application/json",
            "HTTP_IDEMPOTENCY_KEY": key,
            "HTTP_X_TENANT": tenant,
            "HTTP_AUTHORIZATION": "Bearer AUTH-wsgi-secret",
            "HTTP_COOKIE": "session=COOKIE-wsgi-secret",
            "wsgi.input": io.BytesIO(b"{}"),
        }
        json.loads(b"".join(mw(environ, start_response)))
    assert all(s.startswith("201") for s in statuses), statuses
    assert sorted(runs) == sorted(t for t, _ in PAIRS)
    raw = repr(store._records).encode()
    for value in (b"AUTH-wsgi-secret", b"COOKIE-wsgi-secret", b"same-key", b"key-b:key-c"):
        assert value not in raw
