"""What only the Redis store promises: its layout, its expiry, its round trips, its errors.

Against the real server (``ONCELY_REDIS_URL``, 127.0.0.1:6379 by default), each test under a
key prefix of its own that is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from unittest.mock import ANY

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import oncely.stores._async.redis as redis_driver
import oncely.stores._redis_lua as redis_module
from oncely import (
    Claimed,
    ConfigurationError,
    Existing,
    State,
    StoredResponse,
    StoreUnavailable,
    open_async_store,
)
from oncely._codec import encode_response
from oncely.stores.redis import AsyncRedisStore

from .backend_redis import REDIS_URL, delete_prefix, redis_store

FP = "v1:" + "a" * 64
OTHER_FP = "v1:" + "b" * 64
BINARY = bytes(range(256)) * 4 + b"\0\xff\xfe not utf-8: \xc3\x28 tail\0"
_SCHEME, _, _REST = REDIS_URL.partition("://")
CLUSTER = _SCHEME.endswith("+cluster")
# The server itself, or with a cluster its first node, as a plain connection sees it.
NODE_URL = f"{_SCHEME.removesuffix('+cluster')}://{_REST}"

# Commands the scripts run inside the server; they show in the command stats, not on the wire.
INSIDE_SCRIPTS = {"time", "hmget", "hget", "hgetall", "hset", "hdel", "del", "pexpire"}


def new_key() -> str:
    return uuid.uuid4().hex


def response(body: bytes = b'{"id":"pay_1"}', status: int = 201) -> StoredResponse:
    return StoredResponse(status, (("content-type", "application/json"),), body)


@pytest.fixture
async def store() -> AsyncIterator[AsyncRedisStore]:
    made = await redis_store()
    try:
        yield made
    finally:
        await delete_prefix(made.client, made.prefix)
        await made.aclose()


@pytest.fixture
async def admin() -> AsyncIterator[redis.asyncio.Redis]:
    """A connection of the test's own to the first (or only) node, for looking at the server."""
    client = redis.asyncio.Redis.from_url(NODE_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def claim(store: AsyncRedisStore, key: str, fp: str = FP, lease: float = 60) -> Claimed:
    result = await store.claim(key, fp, lease=lease)
    assert isinstance(result, Claimed), result
    return result


async def server_now(store: AsyncRedisStore) -> float:
    seconds, micros = await store.client.time()
    return seconds + micros / 1_000_000 + store.time_offset


class Traffic:
    """What the server saw from its clients while an operation ran, from its own counters.

    The counters are the server's, so another client's traffic at the same moment adds to them;
    it can only add, so an operation is measured again (a few times at most) until a measurement
    shows no more than the operation's own.
    """

    def __init__(self, admin: redis.asyncio.Redis) -> None:
        self.admin = admin

    async def _snapshot(self) -> tuple[dict[str, int], dict[str, int], int]:
        # One INFO for both sections: one read and one command of our own per snapshot.
        info: dict[str, Any] = await self.admin.info("stats", "commandstats")
        stats = {k.removeprefix("cmdstat_"): v for k, v in info.items() if "cmdstat_" in k}
        calls = {name: int(v["calls"]) for name, v in stats.items()}
        failed = {name: int(v["failed_calls"]) for name, v in stats.items() if v["failed_calls"]}
        return calls, failed, int(info["total_reads_processed"])

    async def measure(self, operation: Awaitable[object]) -> tuple[object, Cost]:
        calls0, failed0, reads0 = await self._snapshot()
        result = await operation
        calls1, failed1, reads1 = await self._snapshot()
        delta = {k: n - calls0.get(k, 0) for k, n in calls1.items() if n != calls0.get(k, 0)}
        # The first snapshot; more INFO is another client's, and shows in ``reads`` too.
        delta["info"] -= 1
        if not delta["info"]:
            del delta["info"]
        failed = {k: n - failed0.get(k, 0) for k, n in failed1.items() if n != failed0.get(k, 0)}
        reads = reads1 - reads0 - 1  # the second snapshot's own request
        return result, Cost(delta, failed, reads)

    async def cost(self, prepare: Callable[[], Awaitable[Awaitable[object]]]) -> Cost:
        """The cost of the operation ``prepare`` sets up (setting it up is not counted)."""
        costs = []
        for _ in range(5):
            _, cost = await self.measure(await prepare())
            if cost.reads == 1:
                return cost
            costs.append(cost)
        raise AssertionError(f"more than one round trip: {costs}")


@dataclass
class Cost:
    calls: dict[str, int]  # every command the server ran, those inside scripts too
    failed: dict[str, int]
    reads: int  # requests read from clients: round trips

    @property
    def sent(self) -> dict[str, int]:
        """The commands clients sent; those that scripts ran inside the server are left out."""
        return {k: n for k, n in self.calls.items() if k not in INSIDE_SCRIPTS}


needs_standalone = pytest.mark.skipif(
    CLUSTER, reason="looks at one server: its traffic, its clients"
)


async def test_records_live_under_the_prefix_and_expire_with_forget_at(
    store: AsyncRedisStore, admin: redis.asyncio.Redis
) -> None:
    key = new_key()
    won = await claim(store, key, lease=30)
    name = store.prefix + key
    assert store.redis_key(key) == name
    assert await store.client.type(name) == b"hash"
    record = await store.get(key)
    assert record is not None
    now = await server_now(store)
    pttl = await store.client.pttl(name)
    assert pttl > 0
    assert abs(pttl - (record.forget_at - now) * 1000) < 2000
    assert record.lease_until == won.lease_until

    assert await store.complete(won, response(), ttl=100, tombstone_ttl=1000)
    pttl = await store.client.pttl(name)
    assert 1_097_000 < pttl <= 1_100_000
    record = await store.get(key)
    assert record is not None
    assert abs(pttl - (record.forget_at - await server_now(store)) * 1000) < 2000
    fields = await store.client.hgetall(name)
    assert set(fields) == {
        b"v",
        b"fp",
        b"state",
        b"token",
        b"attempt",
        b"lease_until",
        b"expires_at",
        b"forget_at",
        b"phases",
        b"response",
    }


async def test_the_offset_moves_the_clock_and_the_expiry_follows_it(store: AsyncRedisStore) -> None:
    before = await server_now(store)
    store.time_offset += 3600
    key = new_key()
    await claim(store, key)
    seen = await store.claim(key, FP, lease=60)
    assert isinstance(seen, Existing)
    # The store's clock is Redis's clock plus the offset, in epoch seconds.
    assert 3599 < seen.now - before < 3610
    won = Claimed(key, FP, seen.record.token, 1, seen.record.lease_until)
    assert await store.complete(won, response(), ttl=10, tombstone_ttl=10)
    # forget_at is an hour ahead of Redis's own clock, but the key goes when the store's clock
    # reaches it: in 20 seconds.
    pttl = await store.client.pttl(store.redis_key(key))
    assert 18_000 < pttl <= 20_000


async def test_a_forgotten_record_disappears_by_itself(store: AsyncRedisStore) -> None:
    key = new_key()
    won = await claim(store, key)
    assert await store.complete(won, response(), ttl=0.05, tombstone_ttl=0.05)
    assert await store.client.exists(store.redis_key(key)) == 1
    await asyncio.sleep(0.3)
    assert await store.client.exists(store.redis_key(key)) == 0
    assert await store.get(key) is None
    fresh = await claim(store, key, OTHER_FP)
    assert fresh.attempt == 1


@needs_standalone
async def test_every_operation_is_one_round_trip(
    store: AsyncRedisStore, admin: redis.asyncio.Redis
) -> None:
    traffic = Traffic(admin)
    # Warm up: open the connection and let the server learn the scripts.
    warm = await claim(store, new_key())
    assert await store.renew(warm, lease=60)
    assert await store.record_phase(warm, "warm", "{}")
    assert await store.release(warm)
    warm = await claim(store, new_key())
    assert await store.complete(warm, response(), ttl=100, tombstone_ttl=100)

    async def new_claim() -> Awaitable[object]:
        return store.claim(new_key(), FP, lease=60)

    async def renew() -> Awaitable[object]:
        return store.renew(await claim(store, new_key()), lease=60)

    async def record_phase() -> Awaitable[object]:
        return store.record_phase(await claim(store, new_key()), "charged", '{"id":1}')

    async def complete() -> Awaitable[object]:
        won = await claim(store, new_key())
        return store.complete(won, response(), ttl=100, tombstone_ttl=100)

    async def replay() -> Awaitable[object]:
        won = await claim(store, new_key())
        assert await store.complete(won, response(), ttl=100, tombstone_ttl=100)
        return store.claim(won.key, FP, lease=60)

    async def release() -> Awaitable[object]:
        return store.release(await claim(store, new_key()))

    async def get() -> Awaitable[object]:
        return store.get((await claim(store, new_key())).key)

    for step in (new_claim, renew, record_phase, complete, replay, release):
        cost = await traffic.cost(step)
        assert (cost.sent, cost.reads, cost.failed) == ({"evalsha": 1}, 1, {}), step.__name__
    cost = await traffic.cost(get)
    assert (cost.calls, cost.reads) == ({"hgetall": 1}, 1)

    # What one measurement returns, for the record: a replay's claim answers with the response.
    key = new_key()
    won = await claim(store, key)
    assert await store.complete(won, response(), ttl=100, tombstone_ttl=100)
    seen, _ = await traffic.measure(store.claim(key, FP, lease=60))
    assert isinstance(seen, Existing)
    assert seen.record.response == response()


async def test_two_prefixes_do_not_see_each_other(store: AsyncRedisStore) -> None:
    other = await redis_store()
    try:
        key = new_key()
        mine = await claim(store, key)
        theirs = await claim(other, key, OTHER_FP)
        assert mine.token != theirs.token
        assert await store.complete(mine, response(b"mine"), ttl=1, tombstone_ttl=1)
        store.time_offset += 10
        assert await other.purge() == 0
        assert await store.get(key) is not None
        assert await store.purge() == 1
        assert await store.get(key) is None
        record = await other.get(key)
        assert record is not None
        assert record.fingerprint == OTHER_FP
        assert record.token == theirs.token
    finally:
        await delete_prefix(other.client, other.prefix)
        await other.aclose()


async def test_the_stored_response_is_the_codec_bytes(store: AsyncRedisStore) -> None:
    key = new_key()
    won = await claim(store, key)
    kept = StoredResponse(
        200, (("content-type", "application/octet-stream"), ("etag", '"x"')), BINARY
    )
    assert await store.complete(won, kept, ttl=100, tombstone_ttl=100)
    raw = await store.client.hget(store.redis_key(key), "response")
    assert raw == encode_response(kept)
    assert raw is not None
    assert raw.endswith(b"\0" + BINARY)


async def test_binary_bodies_survive(store: AsyncRedisStore) -> None:
    for body in (BINARY, b"", b"\0", b"\xff" * 70_000, bytes(range(256))[::-1]):
        key = new_key()
        won = await claim(store, key)
        assert await store.complete(won, response(body, 200), ttl=100, tombstone_ttl=100)
        seen = await store.claim(key, FP, lease=60)
        assert isinstance(seen, Existing)
        assert seen.record.state is State.COMPLETED
        assert seen.record.response is not None
        assert seen.record.response.body == body
        record = await store.get(key)
        assert record is not None
        assert record.response == response(body, 200)


async def test_times_are_kept_exactly(store: AsyncRedisStore) -> None:
    key = new_key()
    won = await claim(store, key, lease=12.345678)
    record = await store.get(key)
    assert record is not None
    assert record.lease_until == won.lease_until == record.expires_at
    assert record.forget_at - record.lease_until == pytest.approx(7 * 24 * 3600.0)
    assert record.lease_until % 1 != 0  # microseconds survive


async def test_recovery_points_survive_release_and_takeover(store: AsyncRedisStore) -> None:
    key = new_key()
    first = await claim(store, key)
    assert await store.record_phase(first, "created", '{"id":"pay_1"}')
    assert await store.record_phase(first, "charged", '{"charge":"ch_\\"1\\""}')
    assert await store.release(first)
    record = await store.get(key)
    assert record is not None
    assert record.state is State.IN_FLIGHT
    assert record.phases == (("created", '{"id":"pay_1"}'), ("charged", '{"charge":"ch_\\"1\\""}'))
    again = await claim(store, key)
    assert again.attempt == 2
    assert again.phases == record.phases
    assert not await store.record_phase(first, "zombie", "{}")
    assert await store.release(again)
    other = await store.claim(key, OTHER_FP, lease=60)
    assert isinstance(other, Existing)  # another request may not take the key over


async def test_purge_leaves_other_keys_under_the_prefix_alone(store: AsyncRedisStore) -> None:
    await store.client.set(store.prefix + "a-string", b"x")
    await store.client.hset(store.prefix + "a-hash", mapping={"forget_at": "0"})
    won = await claim(store, new_key())
    assert await store.complete(won, response(), ttl=1, tombstone_ttl=1)
    store.time_offset += 10
    assert await store.purge() == 1
    assert await store.client.get(store.prefix + "a-string") == b"x"
    assert await store.client.hget(store.prefix + "a-hash", "forget_at") == b"0"


async def test_purge_strips_only_expired_bodies(store: AsyncRedisStore) -> None:
    tomb, live = new_key(), new_key()
    for key, ttl in ((tomb, 10.0), (live, 1000.0)):
        won = await claim(store, key)
        assert await store.complete(won, response(), ttl=ttl, tombstone_ttl=1000)
    store.time_offset += 20
    assert await store.purge() == 0
    assert await store.client.hexists(store.redis_key(tomb), "response") == 0
    assert await store.client.hexists(store.redis_key(live), "response") == 1
    tombstone = await store.get(tomb)
    assert tombstone is not None
    assert tombstone.state is State.COMPLETED
    assert tombstone.fingerprint == FP


async def test_a_resent_claim_owns_the_key_it_wrote(
    store: AsyncRedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the client's retry after a lost answer does: the same script with the same token.
    monkeypatch.setattr(redis_driver, "new_token", lambda now=None: "f" * 32)
    key = new_key()
    first = await claim(store, key)
    second = await claim(store, key)
    assert second.token == first.token == "f" * 32
    assert second.attempt == 1
    monkeypatch.undo()
    seen = await store.claim(key, FP, lease=60)
    assert isinstance(seen, Existing)


async def test_a_winning_claim_is_answered_without_the_record(
    store: AsyncRedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies: list[Any] = []
    run = store._eval

    async def spy(*args: Any) -> Any:
        reply = await run(*args)
        replies.append(reply)
        return reply

    monkeypatch.setattr(store, "_eval", spy)
    key = new_key()
    first = await claim(store, key, lease=10)
    # A win: the attempt, the lease and the recovery points, no more.
    assert replies[-1] == [1, 1, ANY, b"[]"]
    assert float(replies[-1][2]) == first.lease_until
    assert await store.record_phase(first, "charged", '{"id":1}')
    store.time_offset += 11
    second = await claim(store, key, lease=10)
    assert replies[-1] == [1, 2, ANY, b'[["charged","{\\"id\\":1}"]]']
    assert float(replies[-1][2]) == second.lease_until
    assert second.phases == (("charged", '{"id":1}'),)
    assert await store.complete(second, response(), ttl=100, tombstone_ttl=100)
    # Anything else: the server's clock and every field of the record, the response included.
    seen = await store.claim(key, FP, lease=10)
    assert isinstance(seen, Existing)
    assert len(replies[-1]) == 12
    assert replies[-1][0] == 0
    assert replies[-1][-1] == encode_response(response())
    assert seen.record == await store.get(key)


@needs_standalone
async def test_a_script_the_server_does_not_know_is_sent_whole_once(
    store: AsyncRedisStore, admin: redis.asyncio.Redis
) -> None:
    traffic = Traffic(admin)
    await claim(store, new_key())  # the connection is open
    for _ in range(5):
        # A script text of its own, so that no other client has loaded it.
        store._claim = redis_module.Script(redis_module.CLAIM + f"-- {new_key()}\n")
        won, first = await traffic.measure(store.claim(new_key(), FP, lease=60))
        assert isinstance(won, Claimed)
        if first.reads == 2:
            break
    else:
        raise AssertionError("never measured a claim alone")
    assert first.sent == {"evalsha": 1, "eval": 1}

    async def another() -> Awaitable[object]:
        return store.claim(new_key(), FP, lease=60)

    cost = await traffic.cost(another)
    assert (cost.sent, cost.reads, cost.failed) == ({"evalsha": 1}, 1, {})


def named_client(name: str, **options: Any) -> redis.asyncio.Redis:
    """A client of the first node whose connections carry ``name`` (CLIENT LIST shows it)."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(NODE_URL, client_name=name, **options)
    return redis.asyncio.Redis.from_pool(pool)


async def connections_named(admin: redis.asyncio.Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in await admin.client_list() if c.get("name") == name]


@needs_standalone
async def test_scripts_use_at_most_as_many_connections_as_the_pool_allows(
    admin: redis.asyncio.Redis,
) -> None:
    name = f"oncely-test-{new_key()}"
    store = AsyncRedisStore(named_client(name, max_connections=3), prefix=f"oncely-test:{name}:")
    store._batcher.max_size = 1  # each script its own round trip: more lanes than connections
    try:
        results = await asyncio.gather(*(store.claim(new_key(), FP, lease=60) for _ in range(40)))
        assert all(isinstance(r, Claimed) for r in results)
        assert len(await connections_named(admin, name)) == 3
    finally:
        await delete_prefix(admin, store.prefix)
        await store.aclose()
    for _ in range(50):  # the server notices the closes soon after
        if not await connections_named(admin, name):
            break
        await asyncio.sleep(0.02)
    assert await connections_named(admin, name) == []


@needs_standalone
async def test_with_every_connection_busy_a_call_waits_then_gives_up(
    admin: redis.asyncio.Redis,
) -> None:
    client = redis.asyncio.Redis.from_pool(
        redis.asyncio.BlockingConnectionPool.from_url(NODE_URL, max_connections=1, timeout=0.2)
    )
    store = AsyncRedisStore(client, prefix=f"oncely-test:{new_key()}:")
    connections = store._connections
    assert connections is not None
    try:
        held = await connections.take()  # the only one
        with pytest.raises(StoreUnavailable, match="No connection available"):
            await store.claim(new_key(), FP, lease=60)
        waiting = asyncio.create_task(store.claim(new_key(), FP, lease=60))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        connections.give_back(held)
        assert isinstance(await waiting, Claimed)
        assert isinstance(await store.claim(new_key(), FP, lease=60), Claimed)
    finally:
        await delete_prefix(admin, store.prefix)
        await store.aclose()


@needs_standalone
async def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error(
    admin: redis.asyncio.Redis,
) -> None:
    name = f"oncely-test-{new_key()}"
    # No retries: the replacement is the store's doing, not a retry of a failed command.
    store = AsyncRedisStore(
        named_client(name, retry=Retry(NoBackoff(), 0)), prefix=f"oncely-test:{name}:"
    )
    try:
        await claim(store, new_key())
        (idle,) = await connections_named(admin, name)
        assert await admin.client_kill_filter(_id=idle["id"]) == 1
        await asyncio.sleep(0.1)  # the client sees the connection close
        await claim(store, new_key())
        (fresh,) = await connections_named(admin, name)
        assert fresh["id"] != idle["id"]
    finally:
        await delete_prefix(admin, store.prefix)
        await store.aclose()


async def test_calls_cut_short_leave_no_answer_behind_for_the_next(store: AsyncRedisStore) -> None:
    # Cancelled at every point of their round trip (before sending, while the server runs the
    # script, while the answer comes in), calls must not leave an answer on a connection for a
    # later call to take as its own.
    keys = [new_key() for _ in range(100)]
    for i, key in enumerate(keys):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(i * 0.000002):
                await store.claim(key, FP, lease=60)
    for key in keys:
        seen = await store.claim(key, OTHER_FP, lease=60)
        record = await store.get(key)
        assert record is not None
        if isinstance(seen, Claimed):  # the first claim never ran
            assert (record.token, record.fingerprint) == (seen.token, OTHER_FP)
        else:
            assert seen.record == record
            assert record.fingerprint == FP


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_server_is_store_unavailable() -> None:
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    store = AsyncRedisStore(client, prefix="oncely-test:unreachable:")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim(new_key(), FP, lease=60)
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        assert caught.value.status == 503
        with pytest.raises(StoreUnavailable):
            await store.get(new_key())
        with pytest.raises(StoreUnavailable):
            await store.purge()
        won = Claimed(new_key(), FP, "0" * 32, 1, 0.0)
        with pytest.raises(StoreUnavailable):
            await store.complete(won, response(), ttl=1, tombstone_ttl=1)
    finally:
        await store.aclose()


@needs_standalone
async def test_a_server_that_does_not_answer_in_time_is_store_unavailable(
    admin: redis.asyncio.Redis,
) -> None:
    # CLIENT PAUSE holds every client of the server for 300 ms at most.
    client = redis.asyncio.Redis.from_url(
        REDIS_URL, socket_timeout=0.05, retry=Retry(NoBackoff(), 0)
    )
    store = AsyncRedisStore(client, prefix="oncely-test:paused:")
    try:
        await client.ping()
        await admin.client_pause(300)
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim(new_key(), FP, lease=60)
        assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
    finally:
        await admin.client_unpause()
        await delete_prefix(admin, "oncely-test:paused:")
        await store.aclose()


async def test_urls_and_options() -> None:
    store = open_async_store("redis://127.0.0.1:6379/0", prefix="p:", time_offset=5.0)
    assert isinstance(store, AsyncRedisStore)
    assert isinstance(store.client, redis.asyncio.Redis)
    assert (store.prefix, store.time_offset) == ("p:", 5.0)
    await store.aclose()
    # The +cluster forms make a cluster client (it connects on first use).
    for url in ("redis+cluster://127.0.0.1:7000", "rediss+cluster://u:p@127.0.0.1:7000"):
        store = open_async_store(url)
        assert isinstance(store, AsyncRedisStore)
        assert isinstance(store.client, RedisCluster)
        assert store.prefix == "oncely:"
        await store.aclose()
    for url in (
        "redis+cluster://127.0.0.1:7000/1",
        "redis://127.0.0.1:6379/0?socket_timeout=soon",
        "redis:nohost",
    ):
        with pytest.raises(ConfigurationError):
            open_async_store(url)


async def test_a_client_that_decodes_responses_is_refused() -> None:
    client = redis.asyncio.Redis.from_url(NODE_URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses=False"):
            AsyncRedisStore(client)
    finally:
        await client.aclose()
