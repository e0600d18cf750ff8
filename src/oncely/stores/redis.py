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

from ._async.redis import AsyncRedisStore
from ._sync.redis import RedisStore

__all__ = ["AsyncRedisStore", "RedisStore"]
