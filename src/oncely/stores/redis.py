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

- ``claim`` is one EVALSHA that applies the claim rule of ``stores/_rules.py`` and answers with
  the server's clock and the whole record: the caller owns the key exactly when the record
  carries the token it proposed. ``complete``, ``release``, ``renew`` and ``record_phase`` are
  one EVALSHA each, taking effect only while the token still owns the key (state in flight).
- Time is Redis's clock (``TIME`` inside the scripts) plus ``time_offset`` seconds, as epoch
  seconds. Records carry their times; the scripts decide from those, and each write also sets
  the key's expiry so that Redis drops it by itself when the clock reaches ``forget_at``.
  ``purge`` deletes what is logically forgotten before then, and strips the bodies of completed
  records past ``expires_at``, which are never replayed anyway.
- Keep ``maxmemory-policy`` at ``noeviction`` (or a ``volatile-*`` policy on an instance that
  holds nothing else with an expiry): an evicted record frees its key, and a repeat runs again.
- Failures of the server or the connection are raised as :class:`oncely.StoreUnavailable`.
- Needs Redis 6.0 or later (or a server that speaks its commands and Lua, such as Valkey).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

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

__all__ = ["RedisStore"]

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

# The claim rule of stores/_rules.py:
#   fresh:    no record, or it is past forget_at: start over (attempt 1, no recovery points)
#   takeover: in flight, lease expired, same fingerprint: new token, attempt + 1, phases kept
#   else:     leave the record as it is
# Either way the answer is {won, now, field, value, ...} with the record as it now stands.
# KEYS: record. ARGV: fingerprint, token, lease, time offset, abandoned retention, format version.
_CLAIM = (
    _PRELUDE
    + """
local key, fp, token = KEYS[1], ARGV[1], ARGV[2]
local now = clock(ARGV[4])
local old = redis.call('HMGET', key, 'forget_at', 'state', 'lease_until', 'fp', 'attempt')
local attempt
if not old[1] or tonumber(old[1]) <= now then
  attempt = 1
  redis.call('DEL', key)
  redis.call('HSET', key, 'phases', '[]')
elseif old[2] == 'in_flight' and tonumber(old[3]) <= now and old[4] == fp then
  attempt = tonumber(old[5]) + 1
else
  return {0, num(now), unpack(redis.call('HGETALL', key))}
end
local lease_until = now + tonumber(ARGV[3])
local forget_at = lease_until + tonumber(ARGV[5])
redis.call('HSET', key, 'v', ARGV[6], 'fp', fp, 'state', 'in_flight', 'token', token,
  'attempt', tostring(attempt), 'lease_until', num(lease_until), 'expires_at', num(lease_until),
  'forget_at', num(forget_at))
expire(key, forget_at, now)
return {1, num(now), unpack(redis.call('HGETALL', key))}
"""
)

# KEYS: record. ARGV: token, ttl, tombstone ttl, time offset, response bytes.
_COMPLETE = (
    _PRELUDE
    + """
local key = KEYS[1]
local cur = redis.call('HMGET', key, 'token', 'state')
-- Idempotent for its own token: a retry after a lost reply learns its response is stored.
if cur[1] == ARGV[1] and cur[2] == 'completed' then return 1 end
if not owned(key, ARGV[1]) then return 0 end
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


def _num(value: float) -> str:
    return repr(float(value))


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}


def _as_bytes(fields: Mapping[Any, Any]) -> dict[bytes, bytes]:
    return {bytes(name): bytes(value) for name, value in fields.items()}


def _record(key: str, fields: Mapping[bytes, bytes]) -> Record:
    version = fields.get(b"v")
    if version != str(FORMAT_VERSION).encode():
        raise ValueError(f"unsupported oncely record format version {version!r} for key {key!r}")
    try:
        response = fields.get(b"response")
        phases = json.loads(fields.get(b"phases") or b"[]")
        return Record(
            key=key,
            fingerprint=fields[b"fp"].decode(),
            state=State(fields[b"state"].decode()),
            token=fields[b"token"].decode(),
            attempt=int(fields[b"attempt"]),
            lease_until=float(fields[b"lease_until"]),
            expires_at=float(fields[b"expires_at"]),
            forget_at=float(fields[b"forget_at"]),
            response=None if response is None else decode_response(response),
            phases=tuple((str(name), str(data)) for name, data in phases),
        )
    except KeyError as exc:
        raise ValueError(f"corrupt oncely record for key {key!r}: no field {exc}") from exc


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


class RedisStore:
    """Idempotency records in Redis (``redis://``, ``rediss://``, ``redis+cluster://`` ...).

    ``client`` is a redis-py asyncio client made with ``decode_responses=False``; the store owns
    it and closes it in :meth:`aclose`. ``time_offset`` (seconds) is added to Redis's clock in
    every operation; tests move time with it.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "oncely:",
        time_offset: float = 0.0,
    ) -> None:
        if client.get_encoder().decode_responses:
            raise ConfigurationError("a Redis store needs a client with decode_responses=False")
        self.client = client
        self.prefix = prefix
        self.time_offset = time_offset
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._record_phase = client.register_script(_RECORD_PHASE)
        self._purge = client.register_script(_PURGE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "oncely:",
        time_offset: float = 0.0,
        socket_timeout: float | None = 5.0,
        socket_connect_timeout: float | None = 5.0,
    ) -> RedisStore:
        client = _client_from_url(
            url,
            decode_responses=False,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
        )
        return cls(client, prefix=prefix, time_offset=time_offset)

    def redis_key(self, key: str) -> str:
        """The Redis key that holds the record of storage key ``key``."""
        return self.prefix + key

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"Redis store failed: {type(exc).__name__}: {exc}")

    async def _ready(self) -> None:
        # A cluster client learns the slot layout on first use. Learning it here, before any
        # command, keeps concurrent first commands off redis-py's lazy path, where one task can be
        # handed a connection that another is closing (seen with redis-py 8.1: AttributeError).
        # Once the layout is known this returns at once, without I/O.
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()

    async def claim(self, key: str, fingerprint: str, *, lease: float) -> Claimed | Existing:
        token = new_token()
        try:
            await self._ready()
            reply = await self._claim(
                keys=[self.redis_key(key)],
                args=[
                    fingerprint,
                    token,
                    _num(lease),
                    _num(self.time_offset),
                    _num(ABANDONED_RETENTION),
                    FORMAT_VERSION,
                ],
            )
        except (RedisError, RedisClusterException) as exc:
            raise self._unavailable(exc) from exc
        won, now, *flat = reply
        record = _record(key, _pairs(flat))
        # The token is new, so a record that carries it was written by this claim: also when the
        # script ran once already and only its answer was lost (the client sent it again).
        if won or (record.token == token and record.state is State.IN_FLIGHT):
            return Claimed(
                key=key,
                fingerprint=fingerprint,
                token=token,
                attempt=record.attempt,
                lease_until=record.lease_until,
                phases=record.phases,
            )
        return Existing(record, float(now))

    async def _owner_write(self, script: AsyncScript, claim: Claimed, *args: Any) -> bool:
        try:
            await self._ready()
            done = await script(keys=[self.redis_key(claim.key)], args=[claim.token, *args])
        except (RedisError, RedisClusterException) as exc:
            raise self._unavailable(exc) from exc
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
            self._renew, claim, _num(lease), _num(self.time_offset), _num(ABANDONED_RETENTION)
        )

    async def record_phase(self, claim: Claimed, name: str, data: str) -> bool:
        """Append recovery point (name, data JSON) while ``claim`` owns the key."""
        entry = json.dumps([name, data], separators=(",", ":"), ensure_ascii=True)
        return await self._owner_write(self._record_phase, claim, entry)

    async def get(self, key: str) -> Record | None:
        try:
            await self._ready()
            fields = await self.client.hgetall(self.redis_key(key))
        except (RedisError, RedisClusterException) as exc:
            raise self._unavailable(exc) from exc
        return _record(key, _as_bytes(fields)) if fields else None

    async def purge(self, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` records past ``forget_at``; strip up to ``limit`` bodies past
        ``expires_at``. Scans the prefix; each change is a script that re-checks the record."""
        if limit <= 0:
            return 0
        try:
            await self._ready()
            return await self._purge_scan(limit)
        except (RedisError, RedisClusterException) as exc:
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
        version = str(FORMAT_VERSION).encode()
        for i, name in enumerate(names):
            (v, forget_at, state, expires_at), body_len = replies[2 * i], replies[2 * i + 1]
            if v != version or forget_at is None:
                continue
            if float(forget_at) <= now:
                wanted = 1
            elif state == b"completed" and body_len and float(expires_at) <= now:
                wanted = 2
            else:
                continue
            if budget[wanted] == 0:
                continue
            flags = ["1" if budget[1] else "0", "1" if budget[2] else "0"]
            done = int(
                await self._purge(
                    keys=[name], args=[_num(self.time_offset), FORMAT_VERSION, *flags]
                )
            )
            if done in budget:
                budget[done] -= 1
            if budget[1] == 0 and budget[2] == 0:
                return

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, RedisClusterException) as exc:
            raise self._unavailable(exc) from exc
