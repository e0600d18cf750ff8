"""Redis, standalone or Cluster: one hash per record, every write one Lua script.

    open_store("redis://127.0.0.1:6379/0", prefix="myapp:oncely:")
    open_store("rediss://user:secret@redis.example:6380/0")               # TLS
    open_store("redis+cluster://10.0.0.1:7000")                           # Redis Cluster
    open_store("rediss+cluster://user:secret@cluster.example:7000")       # Cluster over TLS

The ``+cluster`` forms name any one node of a Redis Cluster (``redis+cluster://HOST:PORT``, no
database number); the client discovers the others. Without ``+cluster`` the URL is redis-py's
own (``redis://[[user]:[password]@]host[:port][/db]``, query options included).

Layout: the record under storage key ``K`` is the hash ``{prefix}K`` with the fields ``v``
(format version), ``fp``, ``state``, ``token``, ``attempt``, ``lease_until``, ``expires_at``,
``forget_at``, ``phases`` (JSON text: ``[[name, data], ...]``) and, once completed, ``response``:
the shared codec's bytes (:func:`oncely._codec.encode_response`), the body kept byte for byte.
Every script touches exactly that one key, so any prefix works on Redis Cluster.

- ``claim`` is one EVALSHA that applies the claim rule of ``stores/_rules.py``. A claim that wins
  is answered with what the caller needs (attempt, lease, recovery points); one that does not,
  with the server's clock and the whole record, the response included. A claim sent again after
  its answer was lost finds the record it wrote, with the token it proposed: it owns the key.
  ``complete``, ``release``, ``renew`` and ``record_phase`` are one EVALSHA each, taking effect
  only while the token still owns the key (state in flight). A server that does not know a
  script yet is sent its text instead (EVAL), which also loads it.
- Time is Redis's clock (``TIME`` inside the scripts) plus ``time_offset`` seconds, as epoch
  seconds. Records carry their times; the scripts decide from those, and each write also sets
  the key's expiry so that Redis drops it by itself when the clock reaches ``forget_at``.
  ``purge`` deletes what is logically forgotten before then, and strips the bodies of completed
  records past ``expires_at``, which are never replayed anyway.
- On a standalone server the scripts run on connections the store keeps for them, made by the
  client's connection pool (the same address, credentials, timeouts and retry policy), no more
  of them than the pool's ``max_connections``; with all of them busy a script waits for one, up
  to the pool's timeout. ``get`` and ``purge``'s scan go through the client and its pool; a
  Cluster client runs the scripts too.
- Keep ``maxmemory-policy`` at ``noeviction`` (or a ``volatile-*`` policy on an instance that
  holds nothing else with an expiry): an evicted record frees its key, and a repeat runs again.
- Failures of the server or the connection are raised as :class:`oncely.StoreUnavailable`.
- Needs Redis 6.0 or later (or a server that speaks its commands and Lua, such as Valkey).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
)

from .._codec import (
    FORMAT_VERSION,
    Claimed,
    Existing,
    Record,
    State,
    StoredResponse,
    decode_response,
    encode_response,
)
from .._errors import ConfigurationError, StoreUnavailable
from ._rules import ABANDONED_RETENTION, new_token

__all__ = ["AsyncRedisStore"]

# Shared by every script. Times are epoch seconds on the store's clock; they are written with 17
# significant digits, so that Python reads back exactly the double Lua computed.
_PRELUDE = """
local function clock(offset)
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(offset)
end
local function num(x)
  return string.format('%.17g', x)
end
-- Redis drops the key by itself when the store's clock reaches forget_at.
local function expire(key, forget_at, now)
  local ms = math.ceil((forget_at - now) * 1000)
  if ms < 1 then ms = 1 end
  redis.call('PEXPIRE', key, string.format('%d', ms))
end
local function owned(key, token)
  local cur = redis.call('HMGET', key, 'token', 'state')
  return cur[1] == token and cur[2] == 'in_flight'
end
"""

# The record's fields, in the order the claim script answers them when it does not win.
_FIELDS = (
    "v",
    "fp",
    "state",
    "token",
    "attempt",
    "lease_until",
    "expires_at",
    "forget_at",
    "phases",
    "response",
)

# The claim rule of stores/_rules.py:
#   fresh:    no record, or it is past forget_at: start over (attempt 1, no recovery points)
#   takeover: in flight, lease expired, same fingerprint: new token, attempt + 1, phases kept
#   else:     leave the record as it is
# A win answers {1, attempt, lease_until, phases}; anything else {0, now, <the fields above>},
# the record as it stands (a missing field is nil).
# KEYS: record. ARGV: fingerprint, token, lease, time offset, abandoned retention, format version.
_CLAIM = (
    _PRELUDE
    + """
local key, fp, token = KEYS[1], ARGV[1], ARGV[2]
local now = clock(ARGV[4])
local cur = redis.call('HMGET', key, 'v', 'fp', 'state', 'token', 'attempt', 'lease_until',
  'expires_at', 'forget_at', 'phases', 'response')
local attempt, phases
if not cur[8] or tonumber(cur[8]) <= now then
  attempt, phases = 1, '[]'
  redis.call('DEL', key)
elseif cur[3] == 'in_flight' and tonumber(cur[6]) <= now and cur[2] == fp then
  attempt, phases = tonumber(cur[5]) + 1, cur[9] or '[]'
else
  return {0, num(now), unpack(cur)}
end
local lease_until = now + tonumber(ARGV[3])
local forget_at = lease_until + tonumber(ARGV[5])
local until_text = num(lease_until)
redis.call('HSET', key, 'v', ARGV[6], 'fp', fp, 'state', 'in_flight', 'token', token,
  'attempt', tostring(attempt), 'lease_until', until_text, 'expires_at', until_text,
  'forget_at', num(forget_at), 'phases', phases)
expire(key, forget_at, now)
return {1, attempt, until_text, phases}
"""
)

# KEYS: record. ARGV: token, ttl, tombstone ttl, time offset, response bytes.
_COMPLETE = (
    _PRELUDE
    + """
local key = KEYS[1]
local cur = redis.call('HMGET', key, 'token', 'state')
if cur[1] ~= ARGV[1] then return 0 end
-- Idempotent for its own token: a retry after a lost reply learns its response is stored.
if cur[2] == 'completed' then return 1 end
if cur[2] ~= 'in_flight' then return 0 end
local now = clock(ARGV[4])
local expires_at = now + tonumber(ARGV[2])
local forget_at = expires_at + tonumber(ARGV[3])
redis.call('HSET', key, 'state', 'completed', 'response', ARGV[5],
  'expires_at', num(expires_at), 'forget_at', num(forget_at))
expire(key, forget_at, now)
return 1
"""
)

# Without recovery points the key is freed; with them they are kept and the lease ends now, so
# that the next claim takes over and resumes from them.
# KEYS: record. ARGV: token, time offset.
_RELEASE = (
    _PRELUDE
    + """
local key = KEYS[1]
if not owned(key, ARGV[1]) then return 0 end
local phases = redis.call('HGET', key, 'phases')
if not phases or phases == '' or phases == '[]' then
  redis.call('DEL', key)
else
  local now = num(clock(ARGV[2]))
  redis.call('HSET', key, 'lease_until', now, 'expires_at', now)
end
return 1
"""
)

# KEYS: record. ARGV: token, lease, time offset, abandoned retention.
_RENEW = (
    _PRELUDE
    + """
local key = KEYS[1]
if not owned(key, ARGV[1]) then return 0 end
local now = clock(ARGV[3])
local lease_until = now + tonumber(ARGV[2])
local forget_at = math.max(tonumber(redis.call('HGET', key, 'forget_at')),
  lease_until + tonumber(ARGV[4]))
redis.call('HSET', key, 'lease_until', num(lease_until), 'expires_at', num(lease_until),
  'forget_at', num(forget_at))
expire(key, forget_at, now)
return 1
"""
)

# Appends one recovery point, given as its JSON text ["name","data"], to the phases array.
# KEYS: record. ARGV: token, entry.
_RECORD_PHASE = (
    _PRELUDE
    + """
local key = KEYS[1]
if not owned(key, ARGV[1]) then return 0 end
local phases = redis.call('HGET', key, 'phases')
if not phases or phases == '' or phases == '[]' then
  phases = '[' .. ARGV[2] .. ']'
else
  phases = string.sub(phases, 1, -2) .. ',' .. ARGV[2] .. ']'
end
redis.call('HSET', key, 'phases', phases)
return 1
"""
)

# Decides on the record as it is now, so a key claimed again since the scan is left alone.
# Answers 1: deleted (past forget_at), 2: body stripped (completed, past expires_at), 0: neither.
# KEYS: record. ARGV: time offset, format version, may delete ('1'/'0'), may strip ('1'/'0').
_PURGE = (
    _PRELUDE
    + """
local key = KEYS[1]
local cur = redis.call('HMGET', key, 'v', 'forget_at', 'state', 'expires_at')
if cur[1] ~= ARGV[2] or not cur[2] then return 0 end
local now = clock(ARGV[1])
if tonumber(cur[2]) <= now then
  if ARGV[3] ~= '1' then return 0 end
  redis.call('DEL', key)
  return 1
end
if ARGV[4] == '1' and cur[3] == 'completed' and tonumber(cur[4]) <= now then
  return 2 * redis.call('HDEL', key, 'response')
end
return 0
"""
)

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_PURGE_BATCH = 200
_VERSION = str(FORMAT_VERSION).encode()
_RETENTION = repr(ABANDONED_RETENTION).encode()
_STATES = {state.value.encode(): state for state in State}


class _Script:
    """A script's text and its SHA1, as EVAL and EVALSHA take them."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest().encode()


@functools.lru_cache(maxsize=256)
def _num(value: float) -> bytes:
    """A number as the scripts read it: the shortest text that is exactly the same double."""
    return repr(float(value)).encode()


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


def _command(*parts: bytes) -> bytes:
    """One command in the Redis protocol: an array of bulk strings."""
    return b"*%d\r\n%b" % (len(parts), b"".join([b"$%d\r\n%b\r\n" % (len(p), p) for p in parts]))


def _phases(raw: bytes | None) -> tuple[tuple[str, str], ...]:
    if not raw or raw == b"[]":
        return ()
    return tuple((str(name), str(data)) for name, data in json.loads(raw))


def _record(key: str, fields: Sequence[Any]) -> Record:
    """The record from its fields' values in ``_FIELDS`` order (None: missing)."""
    version, fp, state, token, attempt, lease_until, expires_at, forget_at, phases, response = (
        fields
    )
    if version != _VERSION:
        raise ValueError(f"unsupported oncely record format version {version!r} for key {key!r}")
    if None in fields[1:8]:
        missing = next(name for name, value in zip(_FIELDS, fields, strict=True) if value is None)
        raise ValueError(f"corrupt oncely record for key {key!r}: no field {missing!r}")
    return Record(
        key=key,
        fingerprint=fp.decode(),
        state=_STATES.get(state) or State(state.decode()),
        token=token.decode(),
        attempt=int(attempt),
        lease_until=float(lease_until),
        expires_at=float(expires_at),
        forget_at=float(forget_at),
        response=None if response is None else decode_response(bytes(response)),
        phases=_phases(phases),
    )


def _record_of_hash(key: str, fields: Mapping[Any, Any]) -> Record:
    values = {bytes(name): bytes(value) for name, value in fields.items()}
    return _record(key, [values.get(name.encode()) for name in _FIELDS])


class _Connections:
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


def _client_from_url(url: str, **options: Any) -> Redis | RedisCluster:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(f"a Redis store URL looks like redis://HOST:PORT/DB, not {url!r}")
    scheme = scheme.lower()
    try:
        if scheme in _CLUSTER_SCHEMES:
            return RedisCluster.from_url(f"{_CLUSTER_SCHEMES[scheme]}://{rest}", **options)
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
        self._connections = None if isinstance(client, RedisCluster) else _Connections(client)
        self._claim = _Script(_CLAIM)
        self._complete = _Script(_COMPLETE)
        self._release = _Script(_RELEASE)
        self._renew = _Script(_RENEW)
        self._record_phase = _Script(_RECORD_PHASE)
        self._purge = _Script(_PURGE)

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
            await self.client.initialize()

    async def _eval(self, script: _Script, key: bytes, *args: bytes) -> Any:
        """Run ``script`` on ``key``: EVALSHA, or EVAL when the server does not know it yet.

        Raises StoreUnavailable for failures of the server or the connection."""
        try:
            if self._connections is None:
                return await self._eval_on_cluster(script, key, args)
            try:
                return await self._send(_command(b"EVALSHA", script.sha, b"1", key, *args))
            except NoScriptError:
                return await self._send(_command(b"EVAL", script.text, b"1", key, *args))
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc

    async def _eval_on_cluster(self, script: _Script, key: bytes, args: tuple[bytes, ...]) -> Any:
        await self._ready()
        try:
            return await self.client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:
            return await self.client.execute_command("EVAL", script.text, 1, key, *args)

    async def _send(self, command: bytes) -> Any:
        """One command and its reply, on a connection of the store's own, with the connection's
        retry policy (a command resent after a lost reply is sent exactly as it was)."""
        assert self._connections is not None
        conn = await self._connections.take()
        try:

            async def round_trip() -> Any:
                await conn.send_packed_command(command)
                return await conn.read_response()

            async def failed(error: Exception) -> None:
                await conn.disconnect()

            return await conn.retry.call_with_retry(round_trip, failed)
        except ResponseError:
            raise  # the server's answer, read in full: the connection is fine
        except BaseException:
            # redis-py has closed it already on a failure of its own; this covers the rest.
            await conn.disconnect(nowait=True)
            raise
        finally:
            self._connections.give_back(conn)

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode(self._encoding, self._encoding_errors)

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        token = new_token()
        reply = await self._eval(
            self._claim,
            self._key(key),
            fingerprint.encode(),
            token.encode(),
            _num(lease),
            _num(self.time_offset),
            _RETENTION,
            _VERSION,
        )
        if reply[0]:
            _, attempt, lease_until, phases = reply
            return Claimed(
                key=key,
                fingerprint=fingerprint,
                token=token,
                attempt=int(attempt),
                lease_until=float(lease_until),
                phases=_phases(phases),
            )
        record = _record(key, reply[2:])
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

    async def _owner_write(self, script: _Script, claim: Claimed, *args: bytes) -> bool:
        done = await self._eval(script, self._key(claim.key), claim.token.encode(), *args)
        return bool(done)

    async def complete(
        self, claim: Claimed, response: StoredResponse, *, ttl: float, tombstone_ttl: float
    ) -> bool:
        return await self._owner_write(
            self._complete,
            claim,
            _num(ttl),
            _num(tombstone_ttl),
            _num(self.time_offset),
            encode_response(response),
        )

    async def release(self, claim: Claimed) -> bool:
        return await self._owner_write(self._release, claim, _num(self.time_offset))

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        return await self._owner_write(
            self._renew, claim, _num(lease), _num(self.time_offset), _RETENTION
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
        return _record_of_hash(key, fields) if fields else None

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
        pattern = _glob_escape(self.prefix) + "*"
        async for name in self.client.scan_iter(match=pattern, count=1000, _type="hash"):
            batch.append(name)
            if len(batch) >= _PURGE_BATCH:
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
            if v != _VERSION or forget_at is None:
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
                await self._eval(self._purge, bytes(name), _num(self.time_offset), _VERSION, *flags)
            )
            if done in budget:
                budget[done] -= 1
            if budget[1] == 0 and budget[2] == 0:
                return

    async def aclose(self) -> None:
        try:
            if self._connections is not None:
                await self._connections.close()
            await self.client.aclose()
        except Exception as exc:  # see _unavailable: any failure of the client library
            raise self._unavailable(exc) from exc
