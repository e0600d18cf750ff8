"""The Redis store's Lua scripts, key layout and replies, shared by both sides.

:class:`oncely.stores.redis.AsyncRedisStore` and its generated sync twin
:class:`oncely.stores.redis.RedisStore` send exactly these scripts and read their replies with
these functions; see ``oncely/stores/redis.py`` for the store as a whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._codec import FORMAT_VERSION, Record, State, decode_response
from ._rules import ABANDONED_RETENTION

__all__ = [
    "CLAIM",
    "CLUSTER_SCHEMES",
    "COMPLETE",
    "FIELDS",
    "PURGE",
    "PURGE_BATCH",
    "RECORD_PHASE",
    "RELEASE",
    "RENEW",
    "RETENTION",
    "STATES",
    "VERSION",
    "Script",
    "command",
    "glob_escape",
    "num",
    "phases_of",
    "record_of_fields",
    "record_of_hash",
]

# Shared by every script. Times are epoch seconds on the store's clock; they are written with 17
# significant digits, so that Python reads back exactly the double Lua computed.
PRELUDE = """
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
FIELDS = (
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
CLAIM = (
    PRELUDE
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
COMPLETE = (
    PRELUDE
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
RELEASE = (
    PRELUDE
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
RENEW = (
    PRELUDE
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
RECORD_PHASE = (
    PRELUDE
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
PURGE = (
    PRELUDE
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

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
PURGE_BATCH = 200
VERSION = str(FORMAT_VERSION).encode()
RETENTION = repr(ABANDONED_RETENTION).encode()
STATES = {state.value.encode(): state for state in State}


class Script:
    """A script's text and its SHA1, as EVAL and EVALSHA take them."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest().encode()


@functools.lru_cache(maxsize=256)
def num(value: float) -> bytes:
    """A number as the scripts read it: the shortest text that is exactly the same double."""
    return repr(float(value)).encode()


def glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


def command(*parts: bytes) -> bytes:
    """One command in the Redis protocol: an array of bulk strings."""
    return b"*%d\r\n%b" % (len(parts), b"".join([b"$%d\r\n%b\r\n" % (len(p), p) for p in parts]))


def phases_of(raw: bytes | None) -> tuple[tuple[str, str], ...]:
    if not raw or raw == b"[]":
        return ()
    return tuple((str(name), str(data)) for name, data in json.loads(raw))


def record_of_fields(key: str, fields: Sequence[Any]) -> Record:
    """The record from its fields' values in ``FIELDS`` order (None: missing)."""
    version, fp, state, token, attempt, lease_until, expires_at, forget_at, phases, response = (
        fields
    )
    if version != VERSION:
        raise ValueError(f"unsupported oncely record format version {version!r} for key {key!r}")
    if None in fields[1:8]:
        missing = next(name for name, value in zip(FIELDS, fields, strict=True) if value is None)
        raise ValueError(f"corrupt oncely record for key {key!r}: no field {missing!r}")
    return Record(
        key=key,
        fingerprint=fp.decode(),
        state=STATES.get(state) or State(state.decode()),
        token=token.decode(),
        attempt=int(attempt),
        lease_until=float(lease_until),
        expires_at=float(expires_at),
        forget_at=float(forget_at),
        response=None if response is None else decode_response(bytes(response)),
        phases=phases_of(phases),
    )


def record_of_hash(key: str, fields: Mapping[Any, Any]) -> Record:
    values = {bytes(name): bytes(value) for name, value in fields.items()}
    return record_of_fields(key, [values.get(name.encode()) for name in FIELDS])
