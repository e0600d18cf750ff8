"""What clients send (validated before anything runs) and what the service keeps and answers.

Requests are strict: ``amount`` must be a JSON integer (not ``"100"``, ``100.0`` or ``true``),
``currency`` an ISO 4217 code in upper case, and unknown fields are refused, so a typo never
passes silently into a payment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from .currencies import CURRENCIES
from .problems import ApiProblem, invalid

__all__ = [
    "MAX_AMOUNT",
    "TRANSITIONS",
    "Answer",
    "Item",
    "Order",
    "OrderIn",
    "OrderPatch",
    "OrderReplace",
    "Payment",
    "PaymentIn",
    "apply_patch",
    "if_match_allows",
    "items_of",
    "replace_order",
]

# Minor units; the largest amount one payment or order may carry.
MAX_AMOUNT = 99_999_999_999


def _iso_4217(code: str) -> str:
    if code not in CURRENCIES:
        raise ValueError("must be an ISO 4217 currency code in upper case, such as USD or EUR")
    return code


Currency = Annotated[
    str,
    Field(min_length=3, max_length=3, examples=["USD"], description="ISO 4217 code"),
    AfterValidator(_iso_4217),
]
Amount = Annotated[int, Field(gt=0, le=MAX_AMOUNT, description="in minor units (cents)")]
Customer = Annotated[str, Field(min_length=1, max_length=255, examples=["cus_42"])]
Note = Annotated[str, Field(max_length=1000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PaymentIn(_Strict):
    """``POST /payments``. Customers ``cus_decline...`` are declined; ``cus_flaky...`` fail
    once per idempotency key at the card network (503), then succeed."""

    amount: Amount
    currency: Currency
    customer: Customer


class ItemIn(_Strict):
    sku: Annotated[str, Field(min_length=1, max_length=64)]
    quantity: Annotated[int, Field(ge=1, le=10_000)]
    unit_amount: Annotated[int, Field(ge=0, le=MAX_AMOUNT)]


Items = Annotated[list[ItemIn], Field(min_length=1, max_length=100)]


def _total(items: list[ItemIn]) -> int:
    total = sum(item.quantity * item.unit_amount for item in items)
    if total > MAX_AMOUNT:
        raise ValueError(f"the order's total must be at most {MAX_AMOUNT} minor units")
    return total


class OrderIn(_Strict):
    """``POST /orders``: a new order, status ``open``."""

    customer: Customer
    currency: Currency
    items: Items
    note: Note | None = None

    @model_validator(mode="after")
    def _total_fits(self) -> Self:
        _total(self.items)
        return self


class OrderReplace(OrderIn):
    """``PUT /orders/{id}``: the order's whole new content (customer, currency, items, note).

    A field left out takes its default (``note``: none); status and payment change only through
    ``PATCH`` and ``POST /orders/{id}/pay``. Only an open order can be replaced.
    """


class OrderPatch(_Strict):
    """``PATCH /orders/{id}``: the fields to change; at least one.

    ``status``: ``open`` -> ``paid`` (with ``payment``, a succeeded payment of the same amount and
    currency) or ``cancelled``; ``paid`` -> ``fulfilled``. ``items`` only while ``open``.
    ``note``: any string, or null to clear it.
    """

    status: Literal["paid", "fulfilled", "cancelled"] | None = None
    items: Items | None = None
    note: Note | None = None
    payment: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("send at least one of status, items, note, payment")
        for name in ("status", "items", "payment"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        if self.items is not None:
            _total(self.items)
        if self.payment is not None and self.status != "paid":
            raise ValueError("payment is given only with status 'paid'")
        if self.status == "paid" and self.payment is None:
            raise ValueError("status 'paid' needs the payment that paid the order")
        return self


@dataclass(frozen=True, slots=True)
class Payment:
    id: str
    amount: int
    currency: str
    customer: str
    status: str  # pending | succeeded | failed
    order: str | None = None  # the order it pays (POST /orders/{id}/pay)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "amount": self.amount,
            "currency": self.currency,
            "customer": self.customer,
            "status": self.status,
        }
        # Only a payment made for an order names it: POST /payments answers as before.
        if self.order is not None:
            body["order"] = self.order
        return body


@dataclass(frozen=True, slots=True)
class Item:
    sku: str
    quantity: int
    unit_amount: int

    def to_json(self) -> dict[str, Any]:
        return {"sku": self.sku, "quantity": self.quantity, "unit_amount": self.unit_amount}


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    customer: str
    currency: str
    items: tuple[Item, ...]
    status: str  # open | paid | fulfilled | cancelled
    note: str | None
    payment: str | None
    version: int
    created: int
    updated: int

    @property
    def amount(self) -> int:
        return sum(item.quantity * item.unit_amount for item in self.items)

    @property
    def etag(self) -> str:
        """A strong entity tag: it changes with every change to the order."""
        return f'"{self.id}.v{self.version}"'

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "customer": self.customer,
            "currency": self.currency,
            "items": [item.to_json() for item in self.items],
            "amount": self.amount,
            "status": self.status,
            "note": self.note,
            "payment": self.payment,
            "version": self.version,
            "created": self.created,
            "updated": self.updated,
        }


def items_of(items: list[ItemIn]) -> tuple[Item, ...]:
    return tuple(Item(i.sku, i.quantity, i.unit_amount) for i in items)


TRANSITIONS: dict[str, frozenset[str]] = {
    "open": frozenset({"paid", "cancelled"}),
    "paid": frozenset({"fulfilled"}),
    "fulfilled": frozenset(),
    "cancelled": frozenset(),
}


def apply_patch(order: Order, patch: OrderPatch, payment: Payment | None, now: int) -> Order:
    """The order after ``patch``; 409 for a change its status forbids, 422 for a bad payment.

    ``payment``: the tenant's payment ``patch.payment`` names, if it exists.
    """
    changed = order
    if patch.status is not None and patch.status != order.status:
        if patch.status not in TRANSITIONS[order.status]:
            allowed = ", ".join(sorted(TRANSITIONS[order.status])) or "none"
            raise ApiProblem(
                409,
                "order-state-conflict",
                "The order's status does not allow this change",
                f"An order that is {order.status} cannot become {patch.status} (allowed: "
                f"{allowed}). GET the order to see its current state.",
                extensions={"current_status": order.status},
            )
        changed = replace(changed, status=patch.status)
    if patch.status == "paid" and order.status == "open":
        _check_payment(order, patch.payment, payment)
        changed = replace(changed, payment=patch.payment)
    if patch.items is not None:
        if order.status != "open":
            raise ApiProblem(
                409,
                "order-state-conflict",
                "The order's items can no longer change",
                f"Items change only while the order is open; it is {order.status}.",
                extensions={"current_status": order.status},
            )
        changed = replace(changed, items=items_of(patch.items))
    if "note" in patch.model_fields_set:
        changed = replace(changed, note=patch.note)
    return replace(changed, version=order.version + 1, updated=now)


def replace_order(order: Order, new: OrderReplace, now: int) -> Order:
    """The order with ``new``'s content; 409 unless it is still open."""
    if order.status != "open":
        raise ApiProblem(
            409,
            "order-state-conflict",
            "Only an open order can be replaced",
            f"PUT replaces an order while it is open; it is {order.status}. PATCH changes "
            "its note or status.",
            extensions={"current_status": order.status},
        )
    return replace(
        order,
        customer=new.customer,
        currency=new.currency,
        items=items_of(new.items),
        note=new.note,
        version=order.version + 1,
        updated=now,
    )


def _check_payment(order: Order, name: str | None, payment: Payment | None) -> None:
    problem = None
    if payment is None:
        problem = "no such payment"
    elif payment.status != "succeeded":
        problem = f"the payment is {payment.status}, not succeeded"
    elif (payment.amount, payment.currency) != (order.amount, order.currency):
        problem = (
            f"the payment is {payment.amount} {payment.currency}; "
            f"the order is {order.amount} {order.currency}"
        )
    if problem is not None:
        raise invalid([{"field": "payment", "in": "body", "message": problem}])


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole HTTP answer, as sent and as oncely stores it (byte for byte)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


_ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


def if_match_allows(header: str, etag: str) -> bool:
    """RFC 9110 If-Match: ``*`` or a list of entity tags, compared strongly (weak never match)."""
    if header.strip() == "*":
        return True
    position, text = 0, header.strip()
    while position < len(text):
        found = _ENTITY_TAG.match(text, position)
        if found is None:
            return False
        if found.group(1) is None and found.group(2) == etag:
            return True
        position = found.end()
    return False
