"""The PostgreSQL store's SQL, rendered for one table, and its rows read back: shared by both sides.

:class:`oncely.stores.postgres.AsyncPostgresStore` and its generated sync twin
:class:`oncely.stores.postgres.PostgresStore` run exactly these statements; see
``oncely/stores/postgres.py`` for what each does and why.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from psycopg import sql

from .._codec import Claimed, Existing, Record, record_from_columns
from .._errors import ConfigurationError
from ._rules import ABANDONED_RETENTION

__all__ = [
    "CLAIM_TRIES",
    "PURGE_BATCH",
    "Statements",
    "claim_batch_params",
    "claim_params",
    "claim_result",
    "record_from_row",
    "render_statements",
    "render_stats",
    "take_query_option",
    "threshold_from_text",
]

# Claim statements one claim runs at most while claims committed concurrently keep it from an
# answer (see the module docstring).
CLAIM_TRIES = 5

# Rows one purge statement deletes (or strips) at most: short statements, short row locks.
PURGE_BATCH = 500

_COLUMNS = (
    "key, fingerprint, state, token, attempt, lease_until, expires_at, forget_at, response, phases"
)

# The server's clock in epoch seconds, moved by the store's time_offset. Each statement reads it
# once: from a one-row CTE or FROM item, or as an uncorrelated subquery (which can bound an index
# scan). CAST is written out rather than `::`, so that the statements a handler runs through
# SQLAlchemy (where %(name)s becomes :name) stay unambiguous.
_CLOCK = (
    "CAST(extract(epoch FROM clock_timestamp()) AS double precision) "
    "+ CAST(%(offset)s AS double precision)"
)

_CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    key         text COLLATE "C" PRIMARY KEY,
    fingerprint text NOT NULL,
    state       text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    token       text NOT NULL,
    attempt     integer NOT NULL,
    lease_until double precision NOT NULL,
    expires_at  double precision NOT NULL,
    forget_at   double precision NOT NULL,
    response    bytea,
    phases      jsonb NOT NULL DEFAULT '[]'
)
"""

_CREATE_FORGET_INDEX = "CREATE INDEX IF NOT EXISTS {forget_index} ON {table} (forget_at)"

# Completed records that still hold a body, by the end of their replay window (claims write
# response = NULL, so only completed records are in it).
_CREATE_STRIP_INDEX = (
    "CREATE INDEX IF NOT EXISTS {strip_index} ON {table} (expires_at) WHERE response IS NOT NULL"
)

# Which of the store's objects exist: (schema, table, forget index, strip index).
_EXISTING = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %(schema)s),
       to_regclass(%(table)s) IS NOT NULL,
       to_regclass(%(forget_index)s) IS NOT NULL,
       to_regclass(%(strip_index)s) IS NOT NULL
"""

# Held until the end of the migrating transaction (fit for PgBouncer's transaction mode).
_MIGRATE_LOCK = "SELECT pg_advisory_xact_lock(%(lock)s)"

# The claim rule of stores/_rules.py in one statement; `clock` is read once.
#   standing: the record under the key, when the caller cannot take it (a replay, a request in
#             flight): it is the answer, and the INSERT does not run.
#   won:      otherwise the key is taken: inserted, or, on a conflict, the newest committed row
#             is overwritten when the caller wins against it (r.* is that row):
#     fresh:    the old record is past forget_at: start over (attempt 1, no recovery points)
#     takeover: in flight, lease expired, same fingerprint: new token, attempt + 1, phases kept
# At most one of the two has a row. Neither does when a claim committed after the statement's
# snapshot decides the conflict against the caller: the store runs the statement again.
#
# A replay, a refusal or a request in flight is answered by `standing` alone: the INSERT's SELECT
# yields no row, so ON CONFLICT never meets (and never locks) the record, and the statement
# writes nothing and takes no transaction id (so no WAL, and no WAL flush at a COMMIT). Only a
# claim that may win reaches ON CONFLICT, which judges and locks the newest committed row. Why
# the answers stay linearizable although the read sees the snapshot (taken at the statement's
# start, t0) and the conflict check the newest row:
#   - `standing` answers the record R that was current at t0, which the caller cannot take at
#     `now` (read after t0). Whether a record can be taken depends on the time only through
#     forget_at and lease_until, and once past they stay past: R could not be taken at t0
#     either. So the claim takes effect at t0, as a read, and whatever commits after t0 (R
#     completed, released, taken over, stripped or purged) comes after it. A completed R is
#     even still the record at `now`: before its forget_at only a strip changes it, and a strip
#     (past expires_at) leaves nothing that a replay at `now` would read.
#   - `won` is a write under the row lock (or the unique index, for a new key) on the newest
#     row, decided by the same rule, at the same `now`: it takes effect at its commit.
#   - A record R committed after t0 (a claim in flight, or completed since) that refuses the
#     caller gives no row: `standing` did not see it, and the conflict check refuses. The next
#     statement's snapshot sees R and answers it by `standing`, as a read.
# `now` is read once, by both parts, so time cannot pass between the two decisions: a record
# expiring during the statement is judged expired by both or by neither.
_CLAIM = """
WITH clock AS MATERIALIZED (SELECT {clock} AS now),
standing AS MATERIALIZED (
    SELECT {columns} FROM {table} AS r
    WHERE r.key = %(key)s AND NOT {win}
),
won AS (
    INSERT INTO {table} AS r ({columns})
    SELECT %(key)s, %(fp)s, 'in_flight', %(token)s, 1,
           now + CAST(%(lease)s AS double precision),
           now + CAST(%(lease)s AS double precision),
           now + CAST(%(lease)s AS double precision) + CAST(%(retention)s AS double precision),
           NULL, '[]'
    FROM clock
    WHERE NOT EXISTS (SELECT 1 FROM standing)
    ON CONFLICT (key) DO UPDATE SET
        fingerprint = excluded.fingerprint,
        state       = 'in_flight',
        token       = excluded.token,
        attempt     = CASE WHEN {fresh} THEN 1 ELSE r.attempt + 1 END,
        lease_until = excluded.lease_until,
        expires_at  = excluded.expires_at,
        forget_at   = excluded.forget_at,
        response    = NULL,
        phases      = CASE WHEN {fresh} THEN '[]' ELSE r.phases END
    WHERE {win}
    RETURNING {returning}
)
SELECT {columns}, (SELECT now FROM clock) FROM won
UNION ALL
SELECT {columns}, (SELECT now FROM clock) FROM standing
"""
_FRESH = "(r.forget_at <= (SELECT now FROM clock))"
_TAKEOVER = (
    "(r.state = 'in_flight' AND r.lease_until <= (SELECT now FROM clock) "
    "AND r.fingerprint = %(fp)s)"
)

# Every write after a claim is fenced by the claim's token.
_OWNED = "key = %(key)s AND token = %(token)s AND state = 'in_flight'"

# Also run by handlers on their own connection, inside their transaction (TransactionalStore).
# Idempotent for its own token: completing again (a retry after a lost reply) matches the row
# and changes nothing, so the caller learns that its response is the one stored.
_COMPLETE = """
UPDATE {table}
SET response = CASE WHEN state = 'in_flight' THEN %(response)s ELSE response END,
    expires_at = CASE WHEN state = 'in_flight'
        THEN clock.now + CAST(%(ttl)s AS double precision) ELSE expires_at END,
    forget_at = CASE WHEN state = 'in_flight'
        THEN clock.now + CAST(%(ttl)s AS double precision)
             + CAST(%(tombstone_ttl)s AS double precision)
        ELSE forget_at END,
    state = 'completed'
FROM (SELECT {clock} AS now) AS clock
WHERE key = %(key)s AND token = %(token)s AND state IN ('in_flight', 'completed')
"""

_RECORD_PHASE = """
UPDATE {table}
SET phases = phases || jsonb_build_array(
    jsonb_build_array(CAST(%(name)s AS text), CAST(%(data)s AS text)))
WHERE {owned}
"""

# Without recovery points the record goes; with them, the lease ends now and they stay, so the
# next claim takes over and resumes. The two conditions exclude each other, so at most one of
# the CTEs touches the row.
_RELEASE = """
WITH gone AS (
    DELETE FROM {table} WHERE {owned} AND phases = '[]' RETURNING 1
), kept AS (
    UPDATE {table} SET lease_until = clock.now, expires_at = clock.now
    FROM (SELECT {clock} AS now) AS clock
    WHERE {owned} AND phases <> '[]'
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM kept)
"""

_RENEW = """
UPDATE {table}
SET lease_until = clock.now + CAST(%(lease)s AS double precision),
    expires_at = clock.now + CAST(%(lease)s AS double precision),
    forget_at = greatest(
        forget_at,
        clock.now + CAST(%(lease)s AS double precision)
        + CAST(%(retention)s AS double precision)
    )
FROM (SELECT {clock} AS now) AS clock
WHERE {owned}
"""

# Batches (the async store's natural batching): one statement for many claims, one for many
# completes, each row decided exactly as by _CLAIM and _COMPLETE. The keys of one statement are
# distinct (ON CONFLICT cannot touch a row twice in one statement); the store splits a batch
# where a key comes again. Each input row carries its ordinal `n`, returned with its answer.
# Rows are inserted in key order, so that two batches lock shared keys in the same order.
# As in _CLAIM, a row whose record refuses it in the snapshot (a replay, say) is answered from
# `standing` and never reaches ON CONFLICT: a batch of replays locks and writes no row, and its
# transaction takes no transaction id.
_CLAIM_BATCH = """
WITH clock AS MATERIALIZED (SELECT {clock} AS now),
input AS MATERIALIZED (
    SELECT * FROM unnest(
        CAST(%(keys)s AS text[]), CAST(%(fps)s AS text[]),
        CAST(%(tokens)s AS text[]), CAST(%(leases)s AS double precision[])
    ) WITH ORDINALITY AS i(key, fp, token, lease, n)
),
standing AS MATERIALIZED (
    SELECT i.n, {returning} FROM input AS i JOIN {table} AS r ON r.key = i.key
    WHERE NOT {win_of_input}
),
won AS (
    INSERT INTO {table} AS r ({columns})
    SELECT i.key, i.fp, 'in_flight', i.token, 1,
           clock.now + i.lease,
           clock.now + i.lease,
           clock.now + i.lease + CAST(%(retention)s AS double precision),
           NULL, '[]'
    FROM input AS i, clock
    WHERE NOT EXISTS (SELECT 1 FROM standing AS s WHERE s.n = i.n)
    ORDER BY i.key COLLATE "C"
    ON CONFLICT (key) DO UPDATE SET
        fingerprint = excluded.fingerprint,
        state       = 'in_flight',
        token       = excluded.token,
        attempt     = CASE WHEN {fresh} THEN 1 ELSE r.attempt + 1 END,
        lease_until = excluded.lease_until,
        expires_at  = excluded.expires_at,
        forget_at   = excluded.forget_at,
        response    = NULL,
        phases      = CASE WHEN {fresh} THEN '[]' ELSE r.phases END
    WHERE {win_of_excluded}
    RETURNING {returning}
)
SELECT {won_columns}, (SELECT now FROM clock), i.n FROM won JOIN input AS i ON i.key = won.key
UNION ALL
SELECT {standing_columns}, (SELECT now FROM clock), s.n FROM standing AS s
"""

_COMPLETE_BATCH = """
UPDATE {table} AS r
SET response = CASE WHEN r.state = 'in_flight' THEN i.response ELSE r.response END,
    expires_at = CASE WHEN r.state = 'in_flight'
        THEN clock.now + i.ttl ELSE r.expires_at END,
    forget_at = CASE WHEN r.state = 'in_flight'
        THEN clock.now + i.ttl + i.tombstone_ttl ELSE r.forget_at END,
    state = 'completed'
FROM (SELECT {clock} AS now) AS clock,
     unnest(
        CAST(%(keys)s AS text[]), CAST(%(tokens)s AS text[]), CAST(%(responses)s AS bytea[]),
        CAST(%(ttls)s AS double precision[]), CAST(%(tombstone_ttls)s AS double precision[])
     ) WITH ORDINALITY AS i(key, token, response, ttl, tombstone_ttl, n)
WHERE r.key = i.key AND r.token = i.token AND r.state IN ('in_flight', 'completed')
RETURNING i.n
"""

_GET = "SELECT {columns} FROM {table} WHERE key = %(key)s"

_PURGE_BATCH = """
WITH doomed AS (
    SELECT key FROM {table}
    WHERE forget_at <= (SELECT {clock})
    ORDER BY forget_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {table} AS r USING doomed WHERE r.key = doomed.key
"""

# Past the replay window a completed record keeps only its fingerprint (a tombstone).
_STRIP_BATCH = """
WITH stale AS (
    SELECT key FROM {table}
    WHERE response IS NOT NULL AND state = 'completed' AND expires_at <= (SELECT {clock})
    ORDER BY expires_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {table} AS r SET response = NULL FROM stale WHERE r.key = stale.key
"""

# What the store holds (stores/_stats.py), at one reading of the clock: the counts by state, the
# earliest lease in flight, and the `limit` oldest leases as three parallel arrays. Cost: one
# sequential scan of the table for the counts (plus a sort of the in-flight rows for the keys);
# a read, taking no row lock.
_STATS = """
WITH clock AS MATERIALIZED (SELECT {clock} AS now),
oldest AS MATERIALIZED (
    SELECT key, attempt, lease_until, token FROM {table}
    WHERE state = 'in_flight' AND forget_at > (SELECT now FROM clock)
    ORDER BY lease_until
    LIMIT %(limit)s
)
SELECT
    count(*) FILTER (WHERE r.forget_at > (SELECT now FROM clock) AND r.state = 'in_flight'),
    count(*) FILTER (WHERE r.forget_at > (SELECT now FROM clock) AND r.state = 'completed'
                     AND r.expires_at > (SELECT now FROM clock)),
    count(*) FILTER (WHERE r.forget_at > (SELECT now FROM clock) AND r.state = 'completed'
                     AND r.expires_at <= (SELECT now FROM clock)),
    count(*) FILTER (WHERE r.forget_at <= (SELECT now FROM clock)),
    min(r.lease_until) FILTER (WHERE r.forget_at > (SELECT now FROM clock)
                               AND r.state = 'in_flight'),
    (SELECT now FROM clock),
    (SELECT array_agg(key ORDER BY lease_until) FROM oldest),
    (SELECT array_agg(attempt ORDER BY lease_until) FROM oldest),
    (SELECT array_agg(lease_until ORDER BY lease_until) FROM oldest),
    (SELECT array_agg(token ORDER BY lease_until) FROM oldest)
FROM {table} AS r
"""


@functools.lru_cache(maxsize=64)
def render_stats(schema: str, table: str) -> str:
    """The stats statement for ``schema.table`` (parameters: ``limit``, ``offset``)."""
    _check_identifier("schema", schema, 63)
    _check_identifier("table", table, _MAX_TABLE_BYTES)
    return (
        sql.SQL(_STATS)
        .format(table=sql.Identifier(schema, table), clock=sql.SQL(_CLOCK))
        .as_string(None)
    )


# Index names derive from the table name and must fit PostgreSQL's 63-byte identifiers.
_MAX_TABLE_BYTES = 63 - len("_expires_at")


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement of the store, rendered for one schema and table (shared by any variant).

    Parameters are psycopg's ``%(name)s``. ``table`` and the index names are also kept as quoted
    strings, as ``to_regclass`` reads them.
    """

    schema: str
    table: str
    forget_index: str
    strip_index: str
    migrate_lock: int
    create_schema: str
    create_table: str
    create_forget_index: str
    create_strip_index: str
    existing: str
    lock: str
    claim: str
    complete: str
    claim_batch: str
    complete_batch: str
    record_phase: str
    release: str
    renew: str
    get: str
    purge_batch: str
    strip_batch: str


def _check_identifier(what: str, name: str, max_bytes: int) -> None:
    if not name or "\0" in name or len(name.encode()) > max_bytes:
        raise ConfigurationError(
            f"{what} name {name!r} must be 1 to {max_bytes} bytes long, without NUL"
        )


def render_statements(schema: str, table: str) -> Statements:
    """The store's SQL for ``schema.table``, quoted with :class:`psycopg.sql.Identifier`."""
    _check_identifier("schema", schema, 63)
    _check_identifier("table", table, _MAX_TABLE_BYTES)
    forget_index, strip_index = f"{table}_forget_at", f"{table}_expires_at"
    names: dict[str, sql.Composable] = {
        "schema": sql.Identifier(schema),
        "table": sql.Identifier(schema, table),
        "forget_index": sql.Identifier(forget_index),
        "strip_index": sql.Identifier(strip_index),
        "columns": sql.SQL(_COLUMNS),
        "returning": sql.SQL(", ".join(f"r.{c.strip()}" for c in _COLUMNS.split(","))),
        "owned": sql.SQL(_OWNED),
        "clock": sql.SQL(_CLOCK),
        "fresh": sql.SQL(_FRESH),
        "takeover": sql.SQL(_TAKEOVER),
        "win": sql.SQL(f"({_FRESH} OR {_TAKEOVER})"),
        "win_of_input": sql.SQL(f"({_FRESH} OR {_TAKEOVER.replace('%(fp)s', 'i.fp')})"),
        "win_of_excluded": sql.SQL(
            f"({_FRESH} OR {_TAKEOVER.replace('%(fp)s', 'excluded.fingerprint')})"
        ),
        "won_columns": sql.SQL(", ".join(f"won.{c.strip()}" for c in _COLUMNS.split(","))),
        "standing_columns": sql.SQL(", ".join(f"s.{c.strip()}" for c in _COLUMNS.split(","))),
    }

    def render(template: str) -> str:
        return sql.SQL(template).format(**names).as_string(None)

    digest = hashlib.blake2b(f"oncely migrate {schema}".encode(), digest_size=8).digest()
    return Statements(
        schema=schema,
        table=sql.Identifier(schema, table).as_string(None),
        forget_index=sql.Identifier(schema, forget_index).as_string(None),
        strip_index=sql.Identifier(schema, strip_index).as_string(None),
        migrate_lock=int.from_bytes(digest, "big", signed=True),
        create_schema=render(_CREATE_SCHEMA),
        create_table=render(_CREATE_TABLE),
        create_forget_index=render(_CREATE_FORGET_INDEX),
        create_strip_index=render(_CREATE_STRIP_INDEX),
        existing=render(_EXISTING),
        lock=render(_MIGRATE_LOCK),
        claim=render(_CLAIM),
        complete=render(_COMPLETE),
        claim_batch=render(_CLAIM_BATCH),
        complete_batch=render(_COMPLETE_BATCH),
        record_phase=render(_RECORD_PHASE),
        release=render(_RELEASE),
        renew=render(_RENEW),
        get=render(_GET),
        purge_batch=render(_PURGE_BATCH),
        strip_batch=render(_STRIP_BATCH),
    )


def record_from_row(row: tuple[Any, ...]) -> Record:
    """A :class:`Record` from the first ten columns of a claim or get row."""
    return record_from_columns(row, row[9])


def claim_params(
    key: str, fingerprint: str, token: str, *, lease: float, offset: float
) -> dict[str, Any]:
    return {
        "key": key,
        "fp": fingerprint,
        "token": token,
        "lease": float(lease),
        "retention": ABANDONED_RETENTION,
        "offset": float(offset),
    }


def claim_batch_params(claims: Sequence[Mapping[str, Any]], *, offset: float) -> dict[str, Any]:
    """The parameters of one batched claim statement, from the :func:`claim_params` of each."""
    return {
        "keys": [c["key"] for c in claims],
        "fps": [c["fp"] for c in claims],
        "tokens": [c["token"] for c in claims],
        "leases": [c["lease"] for c in claims],
        "retention": ABANDONED_RETENTION,
        "offset": float(offset),
    }


def claim_result(row: tuple[Any, ...], token: str) -> Claimed | Existing:
    """What a claim that proposed ``token`` got, from the row the claim statement returned."""
    record = record_from_row(row)
    if record.token != token:
        return Existing(record, float(row[10]))
    return Claimed(
        key=record.key,
        fingerprint=record.fingerprint,
        token=token,
        attempt=record.attempt,
        lease_until=record.lease_until,
        phases=record.phases,
    )


def take_query_option(url: str, name: str) -> tuple[str, str | None]:
    """``url`` without query parameter ``name``, and its last value (None when absent).

    Only URLs (``postgresql://…``) have a query; the other parameters are kept as written.
    """
    base, mark, query = url.partition("?")
    if not mark or "://" not in base:
        return url, None
    kept, value = [], None
    for part in query.split("&"):
        key, _, given = part.partition("=")
        if unquote_plus(key) == name:
            value = unquote_plus(given)
        else:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), value


def threshold_from_text(text: str) -> int | None:
    word = text.strip().lower()
    if word in ("none", "null", "off", ""):
        return None
    try:
        return int(word)
    except ValueError:
        raise ConfigurationError(
            f"prepare_threshold must be a count >= 0 or none, not {text!r}"
        ) from None
