"""The memory store stays bounded under a flood of distinct keys, evicts only what is safe to
evict, and refuses (503) rather than evict a live lease."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from oncely import (
    ConfigurationError,
    StoreUnavailable,
    open_async_store,
    open_store,
    tenant_from_header,
)
from oncely._codec import Claimed, StoredResponse
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import DEFAULT_MAX_RECORDS, AsyncMemoryStore, MemoryStore

from .test_asgi_hostile import _exchange


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_flood_of_completed_keys_stays_bounded() -> None:
    store = MemoryStore(max_records=200, clock=Clock())
    for i in range(5_000):
        claim = store.claim(f"k{i}", "fp", lease=30)
        assert isinstance(claim, Claimed)
        assert store.complete(claim, StoredResponse(200), ttl=3600, tombstone_ttl=3600)
        assert len(store) <= 200
    assert store.evicted >= 4_800
    assert store.refused == 0
    # the newest are kept: oldest completed go first
    assert store.get("k4999") is not None
    assert store.get("k0") is None


def test_live_leases_are_never_evicted_and_a_full_store_refuses() -> None:
    clock = Clock()
    store = MemoryStore(max_records=50, clock=clock)
    live = [store.claim(f"live{i}", "fp", lease=60) for i in range(10)]
    for i in range(2_000):
        claim = store.claim(f"done{i}", "fp", lease=60)
        assert isinstance(claim, Claimed)
        store.complete(claim, StoredResponse(200), ttl=3600, tombstone_ttl=3600)
    for claim in live:
        assert isinstance(claim, Claimed)
        record = store.get(claim.key)
        assert record is not None
        assert record.token == claim.token
    # fill the rest with live leases: nothing is left to evict
    for i in range(40):
        store.claim(f"more{i}", "fp", lease=60)
    with pytest.raises(StoreUnavailable):
        store.claim("one-too-many", "fp", lease=60)
    assert store.refused == 1
    assert len(store) == 50
    for claim in live:
        assert isinstance(claim, Claimed)
        assert store.complete(claim, StoredResponse(200), ttl=3600, tombstone_ttl=3600)
    # a key already held is answered as before, full or not
    again = store.claim("live0", "fp", lease=60)
    assert not isinstance(again, Claimed)
    # once leases expire, abandoned records make room again
    clock.now += 120
    assert isinstance(store.claim("after", "fp", lease=60), Claimed)


def test_forgotten_records_go_first() -> None:
    clock = Clock()
    store = MemoryStore(max_records=10, clock=clock)
    for i in range(10):
        claim = store.claim(f"old{i}", "fp", lease=1)
        assert isinstance(claim, Claimed)
        store.complete(claim, StoredResponse(200), ttl=1, tombstone_ttl=1)
    clock.now += 10
    assert isinstance(store.claim("new", "fp", lease=60), Claimed)
    assert len(store) == 1
    assert store.evicted == 10


def test_max_records_from_url_and_constructor() -> None:
    assert MemoryStore().max_records == DEFAULT_MAX_RECORDS
    sync = open_store("memory:?max_records=7")
    assert isinstance(sync, MemoryStore)
    assert sync.max_records == 7
    assert open_store("memory://?max_records=9").max_records == 9  # type: ignore[attr-defined]
    async_side = open_async_store("memory:?max_records=5")
    assert isinstance(async_side, AsyncMemoryStore)
    assert async_side.sync.max_records == 5
    with pytest.raises(ConfigurationError):
        open_store("memory:?max_records=lots")
    with pytest.raises(ConfigurationError):
        MemoryStore(max_records=0)


def test_a_full_store_is_a_503_problem_through_the_middleware() -> None:
    runs = 0

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    store = AsyncMemoryStore(max_records=1)
    store.sync.claim("held", "fp", lease=600)  # a live lease fills the store
    mw = IdempotencyMiddleware(app, tenant=tenant_from_header("X-Tenant"), store=store)
    headers = [
        (b"idempotency-key", b"k-new"),
        (b"x-tenant", b"t1"),
        (b"content-type", b"application/json"),
    ]
    sent = asyncio.run(_exchange(mw, "POST", headers, [b"{}"], False))
    assert runs == 0
    assert sent[0]["status"] == 503
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/problem+json"
    problem = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert problem["status"] == 503
