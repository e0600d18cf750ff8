"""The ledger: payments and orders, in the same database as oncely's records.

Tables (the same columns in SQLite and PostgreSQL):

    payments  seq, id, tenant, customer, amount, currency, status, charge_id, order_id,
              created, updated
              status: pending (phase 1 committed) -> succeeded | failed (phase 2 committed)
              order_id: the order it pays (POST /orders/{id}/pay), else NULL
    orders    seq, id, tenant, customer, currency, items (JSON), status, note, payment,
              version, created, updated, deleted

``seq`` orders lists (newest first) and backs the ``starting_after`` cursor; ``tenant`` is a
hash of the API key, never the key itself. Timestamps are Unix seconds.

Each function here is a unit of work (see database.py): it yields SQL and oncely operations and
runs inside one transaction. The two phases of a payment:

    phase 1   INSERT payment 'pending'            + attempt.record("payment_created", {"id"})
    (between) the card network, with attempt.downstream_key("charge")
    phase 2   UPDATE payment succeeded | failed   + attempt.complete(status, headers, body)

Paying an order (``POST /orders/{id}/pay``) is the same two phases: phase 1 also checks, with the
order's row locked, that the order is open and has no payment under way, and takes the amount,
currency and customer from it; phase 2 also marks the order paid when the charge succeeded.
While a payment of an order is pending, the order cannot change (409), so the total charged is
the total of the order that phase 2 marks paid.

A ledger apart from the store (``--database``; a Redis store, say) shares no transaction with
oncely's records: the recovery point is recorded after phase 1 commits, and the response after
the handler returns (database.py). A crash or a pause past the lease between the two runs the
phase again, in the next attempt or beside it, so every write here is idempotent by itself:

- the payment's and the order's ids are derived from the request's key (the handler passes
  ``attempt.downstream_key``-based ids), and their INSERTs are ``ON CONFLICT (id) DO NOTHING``
  followed by a read of the row: a phase run again finds the row the first run wrote, and goes
  on with its values;
- paying an order whose payment under that id exists already (pending, or settled and the order
  paid) goes on with that payment instead of refusing it as another payment under way;
- phase 2 accepts a payment already settled with the same status and charge (the card network
  answers a downstream key with the same charge), and an order already paid by it.

So a stale lease holder that wakes up after a takeover writes nothing new: the same row, the
same charge, the same settlement; only its stored response is fenced (the store refuses it) and
its client is told to retry. With a shared transaction the ids stay random and fencing rolls a
stale holder's transaction back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from oncely import Attempt

from . import models
from .database import CompleteAttempt, RecordPhase, Row, Work, execute, query
from .models import (
    Answer,
    Item,
    Order,
    OrderPatch,
    OrderReplace,
    Payment,
    apply_patch,
    if_match_allows,
)
from .problems import ApiProblem, invalid

__all__ = [
    "PAYMENT_CREATED",
    "create_order",
    "create_payment",
    "delete_order",
    "get_order",
    "get_payment",
    "list_orders",
    "list_payments",
    "order_not_found",
    "replace_order",
    "schema",
    "settle_payment",
    "start_order_payment",
    "update_order",
]

# The recovery point of phase 1; its data is {"id": payment id}.
PAYMENT_CREATED = "payment_created"

_SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS payments (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        id        TEXT NOT NULL UNIQUE,
        tenant    TEXT NOT NULL,
        customer  TEXT NOT NULL,
        amount    INTEGER NOT NULL,
        currency  TEXT NOT NULL,
        status    TEXT NOT NULL,
        charge_id TEXT,
        created   INTEGER NOT NULL,
        updated   INTEGER NOT NULL,
        order_id  TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS orders (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        id        TEXT NOT NULL UNIQUE,
        tenant    TEXT NOT NULL,
        customer  TEXT NOT NULL,
        currency  TEXT NOT NULL,
        items     TEXT NOT NULL,
        status    TEXT NOT NULL,
        note      TEXT,
        payment   TEXT,
        version   INTEGER NOT NULL,
        created   INTEGER NOT NULL,
        updated   INTEGER NOT NULL,
        deleted   INTEGER
    )""",
)

_POSTGRES_SCHEMA = tuple(
    statement.replace(
        "INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    ).replace("INTEGER", "BIGINT")
    for statement in _SQLITE_SCHEMA
)

# A ledger created before payments could pay an order gains the column (SQLiteDatabase skips
# the statement when the column is there already).
_SQLITE_MIGRATIONS = ("ALTER TABLE payments ADD COLUMN order_id TEXT",)
_POSTGRES_MIGRATIONS = ("ALTER TABLE payments ADD COLUMN IF NOT EXISTS order_id TEXT",)

_INDEXES = (
    "CREATE INDEX IF NOT EXISTS payments_by_order ON payments (tenant, order_id, status)",
    "CREATE INDEX IF NOT EXISTS payments_by_tenant ON payments (tenant, seq)",
    "CREATE INDEX IF NOT EXISTS payments_by_customer ON payments (tenant, customer, seq)",
    "CREATE INDEX IF NOT EXISTS orders_by_tenant ON orders (tenant, seq)",
    "CREATE INDEX IF NOT EXISTS orders_by_payment ON orders (tenant, payment)",
)


def schema(dialect: str, namespace: str = "public") -> tuple[str, ...]:
    """The statements that create the ledger's tables; safe to run again.

    PostgreSQL: in schema ``namespace`` (a checked lower-case identifier), which the ledger's
    connections put first on their ``search_path``.
    """
    if dialect == "sqlite":
        return _SQLITE_SCHEMA + _SQLITE_MIGRATIONS + _INDEXES
    return (
        f'CREATE SCHEMA IF NOT EXISTS "{namespace}"',
        *_POSTGRES_SCHEMA,
        *_POSTGRES_MIGRATIONS,
        *_INDEXES,
    )


# Payments ---------------------------------------------------------------------------------

_PAYMENT_COLUMNS = "id, amount, currency, customer, status, order_id"


def _payment(row: Row) -> Payment:
    order = None if row[5] is None else str(row[5])
    return Payment(str(row[0]), int(row[1]), str(row[2]), str(row[3]), str(row[4]), order)


def _key_reused(payment_id: str) -> ApiProblem:
    return ApiProblem(
        422,
        "idempotency-key-reused",
        "This Idempotency-Key made another payment",
        f"Payment {payment_id} was made under this Idempotency-Key with another amount, currency "
        "or customer. Send a new key for a new payment.",
    )


def _phase_1_point(attempt: Attempt, payment: Payment) -> RecordPhase:
    data = {"id": payment.id, "amount": payment.amount, "currency": payment.currency}
    return RecordPhase(attempt, PAYMENT_CREATED, {**data, "customer": payment.customer})


def create_payment(attempt: Attempt, tenant: str, payment: Payment, now: int) -> Work[Payment]:
    """Phase 1: the payment, pending, and the recovery point that names it (and what to charge).

    Idempotent: a payment under ``payment.id`` already there (this phase ran before) is kept
    and returned as it is, if it is the same payment."""
    yield from execute(
        "INSERT INTO payments (id, tenant, customer, amount, currency, status, order_id, "
        "created, updated) VALUES (%(id)s, %(tenant)s, %(customer)s, %(amount)s, %(currency)s, "
        "'pending', %(order)s, %(now)s, %(now)s) ON CONFLICT (id) DO NOTHING",
        id=payment.id,
        tenant=tenant,
        customer=payment.customer,
        amount=payment.amount,
        currency=payment.currency,
        order=payment.order,
        now=now,
    )
    kept = yield from get_payment(tenant, payment.id)
    same = ("amount", "currency", "customer", "order")
    if kept is None or any(getattr(kept, f) != getattr(payment, f) for f in same):
        raise _key_reused(payment.id)
    yield _phase_1_point(attempt, kept)
    return kept


def settle_payment(
    attempt: Attempt, payment: Payment, charge_id: str, answer: Answer, now: int
) -> Work[None]:
    """Phase 2: the payment's final status and the response, committed together; a succeeded
    payment of an order marks the order paid in the same transaction."""
    # The response first: a request whose lease was taken over stops here (LeaseLost).
    yield CompleteAttempt(attempt, answer.status, answer.headers, answer.body)
    changed = yield from execute(
        "UPDATE payments SET status = %(status)s, charge_id = %(charge_id)s, "
        "updated = %(now)s WHERE id = %(id)s AND status = 'pending'",
        status=payment.status,
        charge_id=charge_id,
        now=now,
        id=payment.id,
    )
    if changed != 1:
        # Settled already (this phase ran before: a crash or a takeover after its commit) with
        # the same outcome of the same charge, which is all a run again may find.
        rows = yield from query(
            "SELECT status, charge_id FROM payments WHERE id = %(id)s", id=payment.id
        )
        if not rows or tuple(rows[0]) != (payment.status, charge_id):
            raise RuntimeError(f"payment {payment.id} is no longer pending")
    if payment.order is None or payment.status != "succeeded":
        return
    # The order cannot change while its payment is pending (see _refuse_if_paying).
    paid = yield from execute(
        "UPDATE orders SET status = 'paid', payment = %(payment)s, version = version + 1, "
        "updated = %(now)s WHERE id = %(id)s AND status = 'open' AND deleted IS NULL",
        payment=payment.id,
        now=now,
        id=payment.order,
    )
    if paid != 1:
        rows = yield from query(
            "SELECT payment FROM orders WHERE id = %(id)s AND status = 'paid'", id=payment.order
        )
        if not rows or rows[0][0] != payment.id:
            raise RuntimeError(f"order {payment.order} is no longer open")


def start_order_payment(
    attempt: Attempt, tenant: str, order_id: str, payment_id: str, now: int
) -> Work[Payment]:
    """Phase 1 of paying an order: check it can be paid, then create its payment, pending.

    Idempotent: if the payment ``payment_id`` of this order exists (this phase ran before), it
    goes on with it, whatever the order's state since (paid by it, or paying)."""
    kept = yield from get_payment(tenant, payment_id)
    if kept is not None and kept.order == order_id:
        yield _phase_1_point(attempt, kept)
        return kept
    # Lock the order's row first (PostgreSQL; SQLite writers are serial): a concurrent payment
    # of the same order under another key waits here, then sees this one's pending payment.
    yield from execute(
        "UPDATE orders SET version = version WHERE tenant = %(tenant)s AND id = %(id)s "
        "AND deleted IS NULL",
        tenant=tenant,
        id=order_id,
    )
    order = _found((yield from get_order(tenant, order_id)), order_id)
    if order.payment is not None:
        raise ApiProblem(
            409,
            "order-already-paid",
            "The order is already paid",
            f"Order {order_id} was paid by payment {order.payment}; it is not charged again. "
            "A retry of that payment must send its own Idempotency-Key, which replays its answer.",
            extensions={"current_status": order.status, "payment": order.payment},
        )
    if order.status != "open":
        raise ApiProblem(
            409,
            "order-state-conflict",
            "The order's status does not allow this change",
            f"Only an open order can be paid; order {order_id} is {order.status}.",
            extensions={"current_status": order.status},
        )
    yield from _refuse_if_paying(tenant, order_id)
    payment = Payment(payment_id, order.amount, order.currency, order.customer, "pending", order.id)
    return (yield from create_payment(attempt, tenant, payment, now))


def get_payment(tenant: str, payment_id: str) -> Work[Payment | None]:
    rows = yield from query(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE tenant = %(tenant)s AND id = %(id)s",
        tenant=tenant,
        id=payment_id,
    )
    return _payment(rows[0]) if rows else None


def _page(
    table: str,
    columns: str,
    tenant: str,
    filters: Mapping[str, str | None],
    limit: int,
    starting_after: str | None,
    extra: str = "",
) -> Work[tuple[list[Row], bool]]:
    """Newest first, ``limit`` rows after the cursor; and whether more follow."""
    params: dict[str, Any] = {"tenant": tenant, "limit": limit + 1}
    conditions = ["tenant = %(tenant)s"]
    if extra:
        conditions.append(extra)
    if starting_after is not None:
        rows = yield from query(
            f"SELECT seq FROM {table} WHERE tenant = %(tenant)s AND id = %(id)s",
            tenant=tenant,
            id=starting_after,
        )
        if not rows:
            raise invalid(
                [{"field": "starting_after", "in": "query", "message": f"no such {table[:-1]}"}]
            )
        params["before"] = rows[0][0]
        conditions.append("seq < %(before)s")
    for name, value in filters.items():
        if value is not None:
            params[name] = value
            conditions.append(f"{name} = %({name})s")
    rows = yield from query(
        f"SELECT {columns} FROM {table} WHERE {' AND '.join(conditions)} "
        "ORDER BY seq DESC LIMIT %(limit)s",
        **params,
    )
    return rows[:limit], len(rows) > limit


def list_payments(
    tenant: str, *, customer: str | None, limit: int, starting_after: str | None
) -> Work[tuple[list[Payment], bool]]:
    rows, more = yield from _page(
        "payments", _PAYMENT_COLUMNS, tenant, {"customer": customer}, limit, starting_after
    )
    return [_payment(row) for row in rows], more


# Orders -----------------------------------------------------------------------------------

_ORDER_COLUMNS = "id, customer, currency, items, status, note, payment, version, created, updated"


def _order(row: Row) -> Order:
    items = tuple(Item(i["sku"], i["quantity"], i["unit_amount"]) for i in json.loads(row[3]))
    return Order(
        id=str(row[0]),
        customer=str(row[1]),
        currency=str(row[2]),
        items=items,
        status=str(row[4]),
        note=row[5],
        payment=row[6],
        version=int(row[7]),
        created=int(row[8]),
        updated=int(row[9]),
    )


def _items(order: Order) -> str:
    return json.dumps([item.to_json() for item in order.items], separators=(",", ":"))


def create_order(
    tenant: str, order: Order, attempt: Attempt, render: Callable[[Order], Answer]
) -> Work[Answer]:
    """One phase: the order and the response that announces it, rendered from the row kept.

    Idempotent: an order under ``order.id`` already there (this phase ran before) is kept and
    announced as it is now."""
    yield from execute(
        "INSERT INTO orders (id, tenant, customer, currency, items, status, note, payment, "
        "version, created, updated) VALUES (%(id)s, %(tenant)s, %(customer)s, %(currency)s, "
        "%(items)s, %(status)s, %(note)s, NULL, %(version)s, %(created)s, %(updated)s) "
        "ON CONFLICT (id) DO NOTHING",
        id=order.id,
        tenant=tenant,
        customer=order.customer,
        currency=order.currency,
        items=_items(order),
        status=order.status,
        note=order.note,
        version=order.version,
        created=order.created,
        updated=order.updated,
    )
    kept = _found((yield from get_order(tenant, order.id)), order.id)
    answer = render(kept)
    yield CompleteAttempt(attempt, answer.status, answer.headers, answer.body)
    return answer


def get_order(tenant: str, order_id: str) -> Work[Order | None]:
    rows = yield from query(
        f"SELECT {_ORDER_COLUMNS} FROM orders "
        "WHERE tenant = %(tenant)s AND id = %(id)s AND deleted IS NULL",
        tenant=tenant,
        id=order_id,
    )
    return _order(rows[0]) if rows else None


def list_orders(
    tenant: str,
    *,
    status: str | None,
    customer: str | None,
    limit: int,
    starting_after: str | None,
) -> Work[tuple[list[Order], bool]]:
    rows, more = yield from _page(
        "orders",
        _ORDER_COLUMNS,
        tenant,
        {"status": status, "customer": customer},
        limit,
        starting_after,
        extra="deleted IS NULL",
    )
    return [_order(row) for row in rows], more


def order_not_found(order_id: str) -> ApiProblem:
    return ApiProblem(
        404, "not-found", "No such order", f"There is no order {order_id} for this API key."
    )


def _precondition_failed(order: Order) -> ApiProblem:
    return ApiProblem(
        412,
        "precondition-failed",
        "The order has changed",
        "If-Match does not match the order's current ETag: somebody changed it since you read "
        "it. GET the order, apply your change to what it is now, and send its new ETag.",
        extensions={"current_version": order.version},
    )


def _found(order: Order | None, order_id: str) -> Order:
    if order is None:
        raise order_not_found(order_id)
    return order


def _refuse_if_paying(tenant: str, order_id: str) -> Work[None]:
    """409 while a payment of the order is pending: it must not change under its charge."""
    paying = yield from query(
        "SELECT id FROM payments WHERE tenant = %(tenant)s AND order_id = %(order)s "
        "AND status = 'pending'",
        tenant=tenant,
        order=order_id,
    )
    if paying:
        raise ApiProblem(
            409,
            "order-payment-pending",
            "A payment of this order is under way",
            f"Payment {paying[0][0]} of order {order_id} has not finished; the order cannot "
            "change until it does. Retry that payment with its own Idempotency-Key, then GET "
            "the order.",
            extensions={"payment": str(paying[0][0])},
            headers=[("retry-after", "1")],
        )


def _save_order(
    tenant: str,
    order: Order,
    changed: Order,
    render: Callable[[Order], Answer],
    attempt: Attempt | None,
) -> Work[Answer]:
    """Write ``changed`` over ``order`` (the version read) and the response, together."""
    answer = render(changed)
    if attempt is not None:
        yield CompleteAttempt(attempt, answer.status, answer.headers, answer.body)
    count = yield from execute(
        "UPDATE orders SET customer = %(customer)s, currency = %(currency)s, items = %(items)s, "
        "status = %(status)s, note = %(note)s, payment = %(payment)s, version = %(version)s, "
        "updated = %(updated)s "
        "WHERE tenant = %(tenant)s AND id = %(id)s AND version = %(old)s AND deleted IS NULL",
        customer=changed.customer,
        currency=changed.currency,
        items=_items(changed),
        status=changed.status,
        note=changed.note,
        payment=changed.payment,
        version=changed.version,
        updated=changed.updated,
        tenant=tenant,
        id=order.id,
        old=order.version,
    )
    if count != 1:
        raise _precondition_failed(order)
    return answer


def _current(tenant: str, order_id: str, if_match: str) -> Work[Order]:
    """The order, if ``if_match`` names its current version (404, 412) and it is not paying."""
    order = _found((yield from get_order(tenant, order_id)), order_id)
    if not if_match_allows(if_match, order.etag):
        raise _precondition_failed(order)
    yield from _refuse_if_paying(tenant, order_id)
    return order


def update_order(
    tenant: str,
    order_id: str,
    patch: OrderPatch,
    *,
    if_match: str,
    now: int,
    render: Callable[[Order], Answer],
    attempt: Attempt | None,
) -> Work[Answer]:
    """Apply ``patch`` if ``if_match`` still names the order's current version."""
    order = yield from _current(tenant, order_id, if_match)
    payment = None
    if patch.payment is not None:
        payment = yield from get_payment(tenant, patch.payment)
        taken = yield from query(
            "SELECT id FROM orders WHERE tenant = %(tenant)s AND payment = %(payment)s "
            "AND deleted IS NULL",
            tenant=tenant,
            payment=patch.payment,
        )
        if taken:
            raise invalid(
                [{"field": "payment", "in": "body", "message": f"it pays order {taken[0][0]}"}]
            )
    changed = apply_patch(order, patch, payment, now)
    return (yield from _save_order(tenant, order, changed, render, attempt))


def replace_order(
    tenant: str,
    order_id: str,
    new: OrderReplace,
    *,
    if_match: str,
    now: int,
    render: Callable[[Order], Answer],
    attempt: Attempt | None,
) -> Work[Answer]:
    """Replace the open order's content if ``if_match`` still names its current version."""
    order = yield from _current(tenant, order_id, if_match)
    changed = models.replace_order(order, new, now)
    return (yield from _save_order(tenant, order, changed, render, attempt))


def delete_order(tenant: str, order_id: str, *, if_match: str | None, now: int) -> Work[None]:
    """Delete the order (it answers 404 from then on); ``if_match`` is checked when sent."""
    order = _found((yield from get_order(tenant, order_id)), order_id)
    if if_match is not None and not if_match_allows(if_match, order.etag):
        raise _precondition_failed(order)
    yield from _refuse_if_paying(tenant, order_id)
    count = yield from execute(
        "UPDATE orders SET deleted = %(now)s, version = version + 1, updated = %(now)s "
        "WHERE tenant = %(tenant)s AND id = %(id)s AND version = %(old)s AND deleted IS NULL",
        now=now,
        tenant=tenant,
        id=order_id,
        old=order.version,
    )
    if count != 1:
        raise _precondition_failed(order)


def audit_counts() -> Work[dict[str, int]]:
    """Payments recorded, and how many of them repeat a (tenant, customer) pair: in the demo,
    where every intent has a customer of its own, each repeat is a payment made twice."""
    rows = yield from query(
        "SELECT count(*), count(DISTINCT tenant || ' ' || customer) FROM payments"
    )
    recorded, distinct = (int(v) for v in rows[0])
    return {"recorded": recorded, "duplicates": recorded - distinct}
