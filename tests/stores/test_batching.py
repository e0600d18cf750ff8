"""Natural batching in the Redis store, on the real server.

Operations queued while a round trip is out go out together: for Redis, pipelined in one write
on one connection. Conflicting operations for one key in one batch answer as they would one
after another in queue order; a round trip cut on the wire fails exactly its members, and what
the server never saw is not applied; no batch is larger than ``max_size``.

The wire is a TCP proxy in front of the real server (the one of test_driver_failures.py); its
trap resets the connection carrying the next write that contains a pattern, before the server
sees it: when every member of a batch fails and none of them was applied, they shared that write.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

from oncely import Claimed, Existing, StoredResponse, StoreUnavailable
from oncely.stores.redis import AsyncRedisStore

from ..realserver.proxy import StoreProxy
from . import backend_redis

RESPONSE = StoredResponse(status=201, headers=(("content-type", "text/plain"),), body=b"ok")
FP = "fp"


def new_key() -> str:
    return f"batch-rs-{secrets.token_hex(6)}"


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[AsyncRedisStore, StoreProxy]]:
    """A store of its own (one lane) through the proxy, and the proxy."""
    async with AsyncExitStack() as stack:
        probe = await backend_redis.redis_store(f"oncely-test:batch-rs:{secrets.token_hex(6)}:")
        stack.push_async_callback(probe.aclose)
        stack.push_async_callback(backend_redis.delete_prefix, probe.client, probe.prefix)
        proxy = stack.enter_context(StoreProxy(("127.0.0.1", 6379), protocol="redis"))
        store = AsyncRedisStore.from_url(
            f"redis://127.0.0.1:{proxy.port}/0", prefix=probe.prefix, socket_timeout=2.0
        )
        stack.push_async_callback(store.aclose)
        store._batcher.lanes = 1
        yield store, proxy


def shape(result: object) -> object:
    """A result without its random parts (tokens, clocks)."""
    if isinstance(result, Claimed):
        return ("claimed", result.attempt, result.phases)
    if isinstance(result, Existing):
        return ("existing", str(result.record.state.value), result.record.attempt)
    if isinstance(result, BaseException):
        return type(result).__name__
    return result


Step = Callable[[AsyncRedisStore, str, list[object]], Awaitable[object]]


async def together(store: AsyncRedisStore, key: str, steps: list[Step]) -> list[object]:
    done: list[object] = []
    return list(await asyncio.gather(*(step(store, key, done) for step in steps)))


async def in_turn(store: AsyncRedisStore, key: str, steps: list[Step]) -> list[object]:
    done: list[object] = []
    return [await step(store, key, done) for step in steps]


# Leases long enough that no case sees one end on its own on a loaded machine (a case whose
# lease must have ended moves the store's clock past it).
LEASE = 10


def claim(store: AsyncRedisStore, key: str, _: list[object]) -> Awaitable[object]:
    return store.claim(key, FP, lease=LEASE)


async def setup_claim(store: AsyncRedisStore, key: str) -> Claimed:
    won = await store.claim(key, FP, lease=LEASE)
    assert isinstance(won, Claimed)
    return won


CASES: dict[str, tuple[bool, bool, list[str]]] = {
    # name: (claimed first, lease expired first, steps)
    "claim and claim": (False, False, ["claim", "claim"]),
    "complete and takeover": (True, True, ["complete", "claim"]),
    "takeover and complete": (True, True, ["claim", "complete"]),
    "release and claim": (True, False, ["release", "claim"]),
    "claim, renew and record": (True, False, ["claim", "renew", "phase", "complete", "claim"]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_conflicting_operations_in_one_batch_answer_as_in_queue_order(
    proxied: tuple[AsyncRedisStore, StoreProxy], case: str
) -> None:
    store, proxy = proxied
    claimed_first, expired, names = CASES[case]
    answers: list[object] = []
    for run in (together, in_turn):
        key = new_key()
        first = await setup_claim(store, key) if claimed_first else None
        if expired:
            store.time_offset += LEASE + 1
        steps: list[Step] = []
        for name in names:
            if name == "claim":
                steps.append(claim)
            else:
                assert first is not None
                steps.append(operation(name, first))
        before = proxy.sent()["EVALSHA"]
        answers.append([shape(r) for r in await run(store, key, steps)])
        assert proxy.sent()["EVALSHA"] - before == len(steps)  # one script each, no resend
        record = await store.get(key)
        answers.append(None if record is None else (record.state.value, record.attempt))
    assert answers[:2] == answers[2:], answers
    if case == "claim and claim":
        assert answers[0] == [("claimed", 1, ()), ("existing", "in_flight", 1)]


def operation(name: str, first: Claimed) -> Step:
    def run(store: AsyncRedisStore, _key: str, _done: list[object]) -> Awaitable[object]:
        if name == "complete":
            return store.complete(first, RESPONSE, ttl=60, tombstone_ttl=60)
        if name == "release":
            return store.release(first)
        if name == "renew":
            return store.renew(first, lease=30)
        return store.record_phase(first, "charged", "{}")

    return run


async def test_a_cut_round_trip_fails_its_members_only_and_applies_nothing(
    proxied: tuple[AsyncRedisStore, StoreProxy],
) -> None:
    """Twelve claims at once with batches of five: the second write is cut before the server
    sees it. Its five members fail, none of their keys exists; the others are claimed, each
    batch one write (the trap fired once and took exactly one batch)."""
    store, proxy = proxied
    store._batcher.max_size = 5
    keys = [new_key() for _ in range(12)]
    trap = proxy.trap(keys[7].encode(), forward=False)
    results = await asyncio.gather(
        *(store.claim(key, FP, lease=30) for key in keys), return_exceptions=True
    )
    assert trap.sprung.is_set()
    kinds = ["claimed" if isinstance(r, Claimed) else type(r).__name__ for r in results]
    assert kinds == ["claimed"] * 5 + ["StoreUnavailable"] * 5 + ["claimed"] * 2, kinds
    for key, result in zip(keys, results, strict=True):
        record = await store.get(key)
        if isinstance(result, StoreUnavailable):
            assert record is None  # nothing half-applied
        else:
            assert isinstance(result, Claimed)
            assert record is not None
            assert record.token == result.token
    assert proxy.sent()["EVALSHA"] == 7  # the cut five never reached the server, nor again


async def test_a_reply_lost_after_the_server_ran_the_batch_is_not_reported_done_nor_resent(
    proxied: tuple[AsyncRedisStore, StoreProxy],
) -> None:
    store, proxy = proxied
    keys = [new_key() for _ in range(8)]
    trap = proxy.trap(keys[-1].encode(), forward=True)
    results = await asyncio.gather(
        *(store.claim(key, FP, lease=30) for key in keys), return_exceptions=True
    )
    assert trap.sprung.is_set()
    assert trap.answered
    assert any(isinstance(r, StoreUnavailable) for r in results), results
    for key, result in zip(keys, results, strict=True):
        record = await store.get(key)
        assert record is not None
        assert record.state == "in_flight"
        assert record.attempt == 1
        if isinstance(result, Claimed):
            assert record.token == result.token
        else:
            assert isinstance(result, StoreUnavailable)
    assert proxy.sent()["EVALSHA"] == len(keys)  # ran once each: nothing resent blindly


async def test_many_concurrent_claims_share_round_trips(
    proxied: tuple[AsyncRedisStore, StoreProxy],
) -> None:
    """Forty claims at once on one lane, batches of at most sixteen: three writes. The trap on
    the last key of the first batch cuts all sixteen of it and no other."""
    store, proxy = proxied
    store._batcher.max_size = 16
    keys = [new_key() for _ in range(40)]
    proxy.trap(keys[15].encode(), forward=False)
    results = await asyncio.gather(
        *(store.claim(key, FP, lease=30) for key in keys), return_exceptions=True
    )
    failed = [i for i, r in enumerate(results) if isinstance(r, StoreUnavailable)]
    assert failed == list(range(16)), failed
    assert all(isinstance(r, Claimed) for r in results[16:])
    # A lone claim goes out by itself, and at once.
    assert isinstance(await store.claim(new_key(), FP, lease=30), Claimed)
