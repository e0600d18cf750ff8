"""The Redis store's driver, async side: redis-py's asyncio client.

``stores/_sync/redis.py`` is generated from ``stores/_async/redis.py`` by
``scripts/unasync.py``: only the async file is edited by hand. The scripts and replies are
those of ``stores/_redis_lua.py``; see ``oncely/stores/redis.py`` for the store as a whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError

from ..._codec import Claimed, Existing, Record, State, StoredResponse, encode_response
from ..._errors import ConfigurationError, StoreUnavailable
from ...events import StoreStats
from .._redis_lua import (
    CLAIM,
    CLUSTER_SCHEMES,
    COMPLETE,
    PURGE,
    PURGE_BATCH,
    RECORD_PHASE,
    RELEASE,
    RENEW,
    RETENTION,
    STATES,
    VERSION,
    Script,
    command,
    glob_escape,
    num,
    phases_of,
    record_of_fields,
    record_of_hash,
)
from .._rules import new_token
from .._stats import StatsCounter
from ._io import Batcher
from ._redis_io import Connections, cluster_ready, drop

__all__ = ["AsyncRedisStore"]


def _client_from_url(url: str, **options: Any) -> Redis | RedisCluster:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(f"a Redis store URL looks like redis://HOST:PORT/DB, not {url!r}")
    scheme = scheme.lower()
    try:
        if scheme in CLUSTER_SCHEMES:
            return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
        # With every connection busy, a command waits for one (up to the socket timeout), as
        # with PostgreSQL's pool; redis-py's default pool fails it at once ("Too many
        # connections"), which turned a burst of over 100 requests per process into 503s.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=100, timeout=options.get("socket_timeout"), **options
        )
        return Redis.from_pool(pool)
    except (ValueError, RedisClusterException) as exc:
        raise ConfigurationError(f"bad Redis store URL or option: {exc}") from exc


class AsyncRedisStore:
    """Idempotency records in Redis (``redis://``, ``rediss://``, ``redis+cluster://`` ...).

    ``client`` is a redis-py asyncio client made with ``decode_responses=False``; the store owns
    it and closes it in :meth:`aclose`. ``time_offset`` (seconds) is added to Redis's clock in
    every operation; tests move time with it.
    """

    # Every operation is a network round trip: a driver bounds it with its store_timeout.
    in_process = False

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "oncely:",
        time_offset: float = 0.0,
    ) -> None:
        encoder = client.get_encoder()
        if encoder.decode_responses:
            raise ConfigurationError("a Redis store needs a client with decode_responses=False")
        self.client = client
        self.prefix = prefix
        self.time_offset = time_offset
        self._encoding: str = encoder.encoding
        self._encoding_errors: str = encoder.encoding_errors
        self._connections = None if isinstance(client, RedisCluster) else Connections(client)
        self._claim = Script(CLAIM)
        self._complete = Script(COMPLETE)
        self._release = Script(RELEASE)
        self._renew = Script(RENEW)
        self._record_phase = Script(RECORD_PHASE)
        self._purge = Script(PURGE)
        # Scripts queued while a round trip is out go out together, pipelined on one connection.
        self._batcher: Batcher[tuple[Script, tuple[bytes, ...]], Any] = Batcher(
            self._send_scripts, max_size=64, lanes=4
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        /,
        *,
        prefix: str = "oncely:",
        time_offset: float = 0.0,
        **options: Any,
    ) -> AsyncRedisStore:
        """A store for ``url``; other ``options`` go to redis-py's client (``socket_timeout``
        and ``socket_connect_timeout`` are 5 s unless given)."""
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 5.0)
        client = _client_from_url(url, decode_responses=False, **options)
        return cls(client, prefix=prefix, time_offset=time_offset)

    def redis_key(self, key: str) -> str:
        """The Redis key that holds the record of storage key ``key``."""
        return self.prefix + key

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        """The one error of this store: whatever redis-py raised, the store could not be used.

        Not only ``RedisError``: under uvloop a connection whose transport was closed under it
        (a reset) raises ``RuntimeError``, and a failure that escaped as such would skip every
        retry and leave the key in flight until its lease ends, and the retry after it would run
        the request a second time. Cancellation is not an ``Exception`` and passes through.
        """
        if isinstance(exc, StoreUnavailable):
            return exc
        return StoreUnavailable(f"Redis store failed: {type(exc).__name__}: {exc}")

    async def _ready(self) -> None:
        # A cluster client learns the slot layout on first use. Learning it here, before any
        # command, keeps concurrent first commands off redis-py's lazy path, where one task can be
        # handed a connection that another is closing (seen with redis-py 8.1: AttributeError).
        # Once the layout is known this returns at once, without I/O.
        if isinstance(self.client, RedisCluster):
            await cluster_ready(self.client)

    async def _eval(self, script: Script, key: bytes, *args: bytes) -> Any:
        """Run ``script`` on ``key``: EVALSHA, or EVAL when the server does not know it yet.

        Raises StoreUnavailable for failures of the server or the connection."""
        try:
            if self._connections is None:
                return await self._eval_on_cluster(script, key, args)
            return await self._batcher.submit((script, (b"1", key, *args)))
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc

    async def _eval_on_cluster(self, script: Script, key: bytes, args: tuple[bytes, ...]) -> Any:
        await self._ready()
        try:
            return await self.client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:
            return await self.client.execute_command("EVAL", script.text, 1, key, *args)

    async def _send_scripts(self, items: Sequence[tuple[Script, tuple[bytes, ...]]]) -> list[Any]:
        """Run the queued scripts: EVALSHA, and EVAL for those the server does not know yet.

        One script goes out alone through :meth:`_send`, with the connection's retry policy. More
        go out pipelined in one write on one connection, their replies read in order, and are not
        resent: a failure of that round trip fails all of them (some may have run; the callers
        treat StoreUnavailable as unknown). A NOSCRIPT reply means the script did not run, so
        only those items go out again, as EVAL."""
        results = await self._pipeline(
            [command(b"EVALSHA", script.sha, *args) for script, args in items]
        )
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            again = await self._pipeline(
                [command(b"EVAL", items[i][0].text, *items[i][1]) for i in missing]
            )
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, packed: list[bytes]) -> list[Any]:
        """The replies to ``packed``, in order: a value, or the server's error for one command."""
        if len(packed) == 1:
            try:
                return [await self._send(packed[0])]
            except ResponseError as exc:
                return [exc]
        assert self._connections is not None
        conn = await self._connections.take()
        try:
            replies: list[Any] = []
            try:
                await conn.send_packed_command(packed)
                for _ in packed:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:  # read in full: the connection is fine
                        replies.append(exc)
            except Exception as exc:
                # No resend: a script whose reply was lost may have run. Those answered keep
                # their answers; the rest fail (StoreUnavailable: the outcome is unknown).
                await drop(conn)
                return replies + [exc] * (len(packed) - len(replies))
            return replies
        except BaseException:
            await drop(conn)
            raise
        finally:
            self._connections.give_back(conn)

    async def _send(self, packed: bytes) -> Any:
        """One command and its reply, on a connection of the store's own, with the connection's
        retry policy (a command resent after a lost reply is sent exactly as it was)."""
        assert self._connections is not None
        conn = await self._connections.take()
        try:

            async def round_trip() -> Any:
                await conn.send_packed_command([packed])
                return await conn.read_response()

            async def failed(error: Exception) -> None:
                await conn.disconnect()

            return await conn.retry.call_with_retry(round_trip, failed)
        except ResponseError:
            raise  # the server's answer, read in full: the connection is fine
        except BaseException:
            # redis-py has closed it already on a failure of its own; this covers the rest.
            await drop(conn)
            raise
        finally:
            self._connections.give_back(conn)

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode(self._encoding, self._encoding_errors)

    def _token(self) -> str:
        """A new fencing token, its claim's time on the store's clock (this machine's clock,
        moved by ``time_offset`` as the server's is), which a lease's age is read from."""
        return new_token(time.time() + self.time_offset)

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        token = self._token()
        reply = await self._eval(
            self._claim,
            self._key(key),
            fingerprint.encode(),
            token.encode(),
            num(lease),
            num(self.time_offset),
            RETENTION,
            VERSION,
        )
        if reply[0]:
            _, attempt, lease_until, phases = reply
            return Claimed(
                key=key,
                fingerprint=fingerprint,
                token=token,
                attempt=int(attempt),
                lease_until=float(lease_until),
                phases=phases_of(phases),
            )
        record = record_of_fields(key, reply[2:])
        # The token is new, so a record that carries it was written by this claim: the script ran
        # once already and only its answer was lost (the client sent it again).
        if record.token == token and record.state is State.IN_FLIGHT:
            return Claimed(
                key=key,
                fingerprint=fingerprint,
                token=token,
                attempt=record.attempt,
                lease_until=record.lease_until,
                phases=record.phases,
            )
        return Existing(record, float(reply[1]))

    async def _owner_write(self, script: Script, claim: Claimed, *args: bytes) -> bool:
        done = await self._eval(script, self._key(claim.key), claim.token.encode(), *args)
        return bool(done)

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        return await self._owner_write(
            self._complete,
            claim,
            num(ttl),
            num(tombstone_ttl),
            num(self.time_offset),
            encode_response(response),
        )

    async def release(self, claim: Claimed) -> bool:
        return await self._owner_write(self._release, claim, num(self.time_offset))

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        return await self._owner_write(
            self._renew, claim, num(lease), num(self.time_offset), RETENTION
        )

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        entry = json.dumps([name, data], separators=(",", ":"), ensure_ascii=True)
        return await self._owner_write(self._record_phase, claim, entry.encode())

    async def get(self, key: str) -> Record | None:
        try:
            await self._ready()
            fields = await self.client.hgetall(self.redis_key(key))
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc
        return record_of_hash(key, fields) if fields else None

    async def purge(self, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` records past ``forget_at``; strip up to ``limit`` bodies past
        ``expires_at``. Scans the prefix; each change is a script that re-checks the record."""
        if limit <= 0:
            return 0
        try:
            await self._ready()
            return await self._purge_scan(limit)
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc

    async def _purge_scan(self, limit: int) -> int:
        seconds, micros = await self.client.time()
        now = seconds + micros / 1_000_000 + self.time_offset
        budget = {1: limit, 2: limit}  # deletions, strips
        batch: list[bytes] = []
        pattern = glob_escape(self.prefix) + "*"
        async for name in self.client.scan_iter(match=pattern, count=1000, _type="hash"):
            batch.append(name)
            if len(batch) >= PURGE_BATCH:
                await self._purge_batch(batch, now, budget)
                batch.clear()
                if budget[1] == 0 and budget[2] == 0:
                    break
        if batch:
            await self._purge_batch(batch, now, budget)
        return limit - budget[1]

    async def _purge_batch(self, names: list[bytes], now: float, budget: dict[int, int]) -> None:
        # One pipelined read picks the candidates; only they cost a script each.
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(name, ["v", "forget_at", "state", "expires_at"])
                pipe.hstrlen(name, "response")
            replies = await pipe.execute()
        for i, name in enumerate(names):
            (v, forget_at, state, expires_at), body_len = replies[2 * i], replies[2 * i + 1]
            if v != VERSION or forget_at is None:
                continue
            if float(forget_at) <= now:
                wanted = 1
            elif state == b"completed" and body_len and float(expires_at) <= now:
                wanted = 2
            else:
                continue
            if budget[wanted] == 0:
                continue
            flags = [b"1" if budget[1] else b"0", b"1" if budget[2] else b"0"]
            done = int(
                await self._eval(self._purge, bytes(name), num(self.time_offset), VERSION, *flags)
            )
            if done in budget:
                budget[done] -= 1
            if budget[1] == 0 and budget[2] == 0:
                return

    async def stats(self, *, limit: int = 20) -> StoreStats:
        """Records by state and the ``limit`` oldest leases.

        Cost: a SCAN of the prefix (never KEYS: the server keeps answering other clients between
        steps), 1,000 names a step, and one pipelined HMGET round trip per step; memory bounded
        by ``limit``. The counts are a walk, not a snapshot: a record written during the walk
        may be counted or not. Redis drops a record itself at ``forget_at``, so ``expired`` is
        usually 0 here.
        """
        try:
            await self._ready()
            seconds, micros = await self.client.time()
            counter = StatsCounter(seconds + micros / 1_000_000 + self.time_offset, limit)
            batch: list[bytes] = []
            pattern = glob_escape(self.prefix) + "*"
            async for name in self.client.scan_iter(match=pattern, count=1000, _type="hash"):
                batch.append(name)
                if len(batch) >= 1000:
                    await self._stats_batch(batch, counter)
                    batch.clear()
            if batch:
                await self._stats_batch(batch, counter)
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc
        return counter.result()

    async def _stats_batch(self, names: list[bytes], counter: StatsCounter) -> None:
        fields = ["v", "state", "attempt", "lease_until", "expires_at", "forget_at", "token"]
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(name, fields)
            replies = await pipe.execute()
        skip = len(self.prefix.encode(self._encoding, self._encoding_errors))
        for name, (v, state, attempt, lease_until, expires_at, forget_at, token) in zip(
            names, replies, strict=True
        ):
            if v != VERSION or None in (state, attempt, lease_until, expires_at, forget_at):
                continue  # not a record of this format (or gone since the scan)
            counter.add(
                bytes(name)[skip:].decode(self._encoding, self._encoding_errors),
                STATES.get(state) or State(state.decode()),
                int(attempt),
                float(lease_until),
                float(expires_at),
                float(forget_at),
                token.decode() if token else "",
            )

    async def aclose(self) -> None:
        try:
            if self._connections is not None:
                await self._connections.close()
            await self.client.aclose()
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc
