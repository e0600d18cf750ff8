"""The ledger: payments and orders, in the same database as oncely's records.

Tables (the same columns in SQLite and PostgreSQL):

    payments  seq, id, tenant, customer, amount, currency, status, charge_id, created, updated
              status: pending (phase 1 committed) -> succeeded | failed (phase 2 committed)
    orders    seq, id, tenant, customer, currency, items (JSON), status, note, payment,
              version, created, updated, deleted

``seq`` orders lists (newest first) and backs the ``starting_after`` cursor; ``tenant`` is a
hash of the API key, never the key itself. Timestamps are Unix seconds.

Each function here is a unit of work (see database.py): it yields SQL and oncely operations and
runs inside one transaction. The two phases of a payment:

    phase 1   INSERT payment 'pending'            + attempt.record("payment_created", {"id"})
    (between) the card network, with attempt.downstream_key("charge")
    phase 2   UPDATE payment succeeded | failed   + attempt.complete(status, headers, body)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from oncely import Attempt

from .database import CompleteAttempt, RecordPhase, Row, Work, execute, query
from .models import (
    Answer,
    Item,
    Order,
    OrderPatch,
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
    "schema",
    "settle_payment",
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
        updated   INTEGER NOT NULL
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

_INDEXES = (
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
        return _SQLITE_SCHEMA + _INDEXES
    return (f'CREATE SCHEMA IF NOT EXISTS "{namespace}"', *_POSTGRES_SCHEMA, *_INDEXES)


# Payments ---------------------------------------------------------------------------------

_PAYMENT_COLUMNS = "id, amount, currency, customer, status"


def _payment(row: Row) -> Payment:
    return Payment(str(row[0]), int(row[1]), str(row[2]), str(row[3]), str(row[4]))


def create_payment(attempt: Attempt, tenant: str, payment: Payment, now: int) -> Work[None]:
    """Phase 1: the payment, pending, and the recovery point that names it."""
    yield from execute(
        "INSERT INTO payments (id, tenant, customer, amount, currency, status, created, updated) "
        "VALUES (%(id)s, %(tenant)s, %(customer)s, %(amount)s, %(currency)s, 'pending', "
        "%(now)s, %(now)s)",
        id=payment.id,
        tenant=tenant,
        customer=payment.customer,
        amount=payment.amount,
        currency=payment.currency,
        now=now,
    )
    yield RecordPhase(attempt, PAYMENT_CREATED, {"id": payment.id})


def settle_payment(
    attempt: Attempt, payment: Payment, charge_id: str, answer: Answer, now: int
) -> Work[None]:
    """Phase 2: the payment's final status and the response, committed together."""
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
        raise RuntimeError(f"payment {payment.id} is no longer pending")


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


def create_order(tenant: str, order: Order, attempt: Attempt, answer: Answer) -> Work[None]:
    """One phase: the order and the response that announces it."""
    yield CompleteAttempt(attempt, answer.status, answer.headers, answer.body)
    yield from execute(
        "INSERT INTO orders (id, tenant, customer, currency, items, status, note, payment, "
        "version, created, updated) VALUES (%(id)s, %(tenant)s, %(customer)s, %(currency)s, "
        "%(items)s, %(status)s, %(note)s, NULL, %(version)s, %(created)s, %(updated)s)",
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
    order = _found((yield from get_order(tenant, order_id)), order_id)
    if not if_match_allows(if_match, order.etag):
        raise _precondition_failed(order)
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
    answer = render(changed)
    if attempt is not None:
        yield CompleteAttempt(attempt, answer.status, answer.headers, answer.body)
    count = yield from execute(
        "UPDATE orders SET items = %(items)s, status = %(status)s, note = %(note)s, "
        "payment = %(payment)s, version = %(version)s, updated = %(updated)s "
        "WHERE tenant = %(tenant)s AND id = %(id)s AND version = %(old)s AND deleted IS NULL",
        items=_items(changed),
        status=changed.status,
        note=changed.note,
        payment=changed.payment,
        version=changed.version,
        updated=changed.updated,
        tenant=tenant,
        id=order_id,
        old=order.version,
    )
    if count != 1:
        raise _precondition_failed(order)
    return answer


def delete_order(tenant: str, order_id: str, *, if_match: str | None, now: int) -> Work[None]:
    """Delete the order (it answers 404 from then on); ``if_match`` is checked when sent."""
    order = _found((yield from get_order(tenant, order_id)), order_id)
    if if_match is not None and not if_match_allows(if_match, order.etag):
        raise _precondition_failed(order)
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
