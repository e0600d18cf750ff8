"""PostgreSQL: one table that every API host shares, judged by the server's clock.

- Times are epoch seconds (``double precision``) read from the SERVER clock,
  ``extract(epoch FROM clock_timestamp()) + time_offset``, so API hosts whose clocks disagree
  still agree on when a lease or a replay window ends. ``time_offset`` (seconds, default 0) is a
  public attribute; tests move time with it instead of sleeping.
- ``claim`` is ONE statement (one round trip) that writes only when the caller wins. It reads
  the record under the key; when there is one the caller cannot take (by the rule of
  ``stores/_rules.py``: a replay, a request in flight), that record and the server's now are the
  answer, and nothing is written: the ``INSERT`` gets no row to insert, so its ``ON CONFLICT``
  never meets the record (``DO UPDATE`` would lock it even when its ``WHERE`` is false): no new
  row version, no row lock, no transaction id, so no WAL and no WAL flush at the commit: for the
  server a replay is an index read. Otherwise ``INSERT … ON CONFLICT (key) DO UPDATE … WHERE
  <the caller wins>`` takes the key and returns the new record, in the same statement (a new key
  costs one round trip too). The caller owns the key exactly when the returned token is the one
  it proposed.
- The read sees the statement's snapshot, while ``ON CONFLICT`` judges the newest committed row.
  When another claim of the key commits between the two (the snapshot had no record, or one the
  caller could take, and the newest one is not), the statement returns no row and is run again:
  the new snapshot sees that commit. Each repeat needs yet another claim of the same key to
  commit in that short window, so a few are plenty; a claim that still has no answer after
  ``CLAIM_TRIES`` statements raises :class:`oncely.StoreUnavailable`.
- ``complete``, ``record_phase``, ``release`` and ``renew`` are one statement each, guarded by
  key, fencing token and ``state = 'in_flight'``. ``release`` deletes the record, or, when
  recovery points were recorded, expires its lease and keeps them: two data-modifying CTEs with
  exclusive conditions, in one statement. Recovery points are a ``jsonb`` array of
  ``[name, json_text]`` pairs; the response is a ``bytea`` in the shared codec's format.
- Natural batching (the async store): writes that arrive while a round trip is out queue up
  (up to 64, on up to 4 connections at once) and go out together when it returns, in one
  transaction sent in one round trip with psycopg's pipeline mode: ``BEGIN``, then for each run
  of distinct keys in queue order one ``INSERT … SELECT FROM unnest(…) ON CONFLICT`` for its
  claims and one ``UPDATE … FROM unnest(…)`` for its completes, each row decided by the same
  rule and fencing token as alone (replays again only read: a batch of them takes no
  transaction id), one statement each for the rest, then ``COMMIT``. A key that
  comes again starts a new run (``ON CONFLICT`` cannot touch a row twice in one statement), so
  conflicting writes for one key answer as one after another in queue order. A batch whose
  round trip fails fails every member with :class:`oncely.StoreUnavailable` and is not resent;
  a write that goes out alone is its one statement, as before (a claim on a dead pooled
  connection is still tried once more). The sync store, and the statements a handler runs in
  its own transaction, are not batched.
- ``purge`` deletes records past ``forget_at`` in batches of at most 500 rows, each its own
  short statement taking only rows no one else holds (``FOR UPDATE SKIP LOCKED``), then strips
  the bodies of completed records past ``expires_at`` the same way (the tombstone keeps the
  fingerprint). An index on ``forget_at``, and a partial one on ``expires_at`` of records that
  still hold a body, keep both cheap.
- The table (``schema`` and ``table`` options, default ``public.oncely_records``) is created on
  first use when it is missing, or ahead of time with :meth:`PostgresStore.migrate`. Creation
  runs in one transaction under ``pg_advisory_xact_lock``, so processes starting together do
  not race, and only creates what is missing. A role without DDL rights works once the table
  exists.

Statements are prepared on the server: each of the store's few fixed statements is parsed and
planned once per connection, then only bound and executed (``prepare_threshold``, 0 by default,
is psycopg's: how many times a statement runs on a connection before it is prepared).

Fit for PgBouncer in transaction mode. The store keeps no session state: connections are in
autocommit, every operation is a single statement (its own transaction) or a batch of them in
one ``BEGIN … COMMIT`` sent at once, ``migrate`` takes a
transaction-scoped lock only, and nothing is ``SET`` on a session. Prepared statements need
PgBouncer 1.21 or later with ``max_prepared_statements`` above 0, which tracks protocol-level
prepared statements across server connections. With an older PgBouncer, or with
``max_prepared_statements = 0``, pass ``prepare_threshold=None`` (or add
``?prepare_threshold=none`` to the URL): then only the unnamed statement of the extended protocol
is used. ``search_path`` is not relied on: every statement names the table with its schema,
quoted. One exception: ``statement_timeout`` is sent as a startup parameter
(``options=-c statement_timeout=…``), which PgBouncer refuses unless configured to accept it;
behind PgBouncer leave it unset and set it on the role instead
(``ALTER ROLE … SET statement_timeout = '5s'``).

The SQL is kept in module-level constants, rendered for one table by :func:`render_statements`,
and the rows are read back by :func:`record_from_row` and :func:`claim_result`, so that a
synchronous store can run the same statements.

Driver trouble (no server, a pool timeout, a failed statement) is raised as
:class:`oncely.StoreUnavailable`, chained to psycopg's error.
"""

from __future__ import annotations

from ._async.postgres import AsyncPostgresStore
from ._postgres_sql import CLAIM_TRIES, PURGE_BATCH, Statements, render_statements
from ._sync.postgres import PostgresStore

__all__ = [
    "CLAIM_TRIES",
    "PURGE_BATCH",
    "AsyncPostgresStore",
    "PostgresStore",
    "Statements",
    "render_statements",
]
