"""The demo's audit: what the clients intended and were told, against what the service recorded.

    report = await audit(intents, outcomes, ApiLedger(client), charges=card_network_charges(path))
    assert report.ok, report.problems

The ledger is read through the service's public API (``GET /payments``, tenant by tenant) and the
card network's own records are read from its database: the money that moved. For every intent:

- exactly one payment for its customer in its tenant: none lost, none doubled;
- the amount and currency intended, status ``succeeded`` (``failed`` for a declined card);
- every final answer its clients got (201, or 402 for a declined card) names that payment;
- exactly one charge at the card network (approved, or declined): nobody charged twice.

And no tenant holds a payment nobody intended. Customers are unique per intent, so an intent's
payments are its customer's payments.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

__all__ = [
    "ApiLedger",
    "AuditReport",
    "Intent",
    "Kind",
    "Ledger",
    "Outcome",
    "audit",
    "card_network_charges",
]

PAGE_LIMIT = 100
MAX_PAGES = 1_000  # more than 100,000 payments in one tenant is not this demo's


class Kind(enum.StrEnum):
    """What the card network does with an intent's customer."""

    NORMAL = "normal"  # approved: 201
    DECLINE = "decline"  # declined: 402, the attempt recorded as a failed payment
    FLAKY = "flaky"  # 503 on the first attempt of each key, then approved: 201


@dataclass(frozen=True)
class Intent:
    """One payment a client means to make, and the key it retries under."""

    number: int
    tenant: str  # the API key, sent as ``Authorization: Bearer <tenant>``
    key: str
    customer: str
    amount: int
    kind: Kind
    currency: str = "EUR"
    burst: int = 1  # copies of the first request sent at once

    @property
    def final_status(self) -> int:
        return 402 if self.kind is Kind.DECLINE else 201

    @property
    def ledger_status(self) -> str:
        return "failed" if self.kind is Kind.DECLINE else "succeeded"

    @property
    def charge_outcome(self) -> str:
        return "declined" if self.kind is Kind.DECLINE else "approved"

    def body(self) -> bytes:
        return json.dumps(
            {"amount": self.amount, "currency": self.currency, "customer": self.customer},
            separators=(",", ":"),
        ).encode()

    def headers(self) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self.tenant}",
            "idempotency-key": self.key,
            "content-type": "application/json",
        }


@dataclass
class Outcome:
    """What the clients of one intent were told."""

    status: int | None = None  # the first final answer, once there is one
    payment_id: str | None = None
    ids_seen: set[str] = field(default_factory=set)  # ids in every final answer, copies included
    requests: int = 0
    problems: list[str] = field(default_factory=list)  # answers that were not as they should be


class Ledger(Protocol):
    """The payments one tenant sees: all of them, or one customer's."""

    async def payments(self, tenant: str, customer: str | None = None) -> list[dict[str, Any]]: ...


class ApiLedger:
    """The ledger through the service's API: ``GET /payments``, 100 a page, cursor by cursor."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def payments(self, tenant: str, customer: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"limit": PAGE_LIMIT}
        if customer is not None:
            params["customer"] = customer
        found: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):
            response = await self.client.get(
                "/payments", params=params, headers={"authorization": f"Bearer {tenant}"}
            )
            response.raise_for_status()
            page = response.json()
            found.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                return found
            params["starting_after"] = page["data"][-1]["id"]
        raise RuntimeError(f"more than {MAX_PAGES} pages of payments for one tenant")


def card_network_charges(path: Path) -> dict[str, list[str]]:
    """The card network's charges, read from its own database: customer -> outcomes."""
    charges: dict[str, list[str]] = {}
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        for customer, outcome in conn.execute("SELECT customer, outcome FROM charges"):
            charges.setdefault(str(customer), []).append(str(outcome))
    return charges


@dataclass
class AuditReport:
    """What the audit found, by kind of problem; ``ok`` when it found nothing."""

    intents: int = 0
    payments: int = 0  # in the audited tenants
    charges: int = 0  # at the card network, for the audited intents
    duplicates: list[str] = field(default_factory=list)  # more than one payment for an intent
    lost: list[str] = field(default_factory=list)  # no payment for an intent
    wrong: list[str] = field(default_factory=list)  # a payment other than intended
    inconsistent: list[str] = field(default_factory=list)  # a client told something else
    answers: list[str] = field(default_factory=list)  # no final answer; an unexpected one
    strays: list[str] = field(default_factory=list)  # payments nobody intended
    charged: list[str] = field(default_factory=list)  # card network charges not once each
    chaos: list[str] = field(default_factory=list)  # faults asked for that did not happen

    @property
    def problems(self) -> list[str]:
        return [
            *self.duplicates,
            *self.lost,
            *self.wrong,
            *self.inconsistent,
            *self.answers,
            *self.strays,
            *self.charged,
            *self.chaos,
        ]

    @property
    def ok(self) -> bool:
        return not self.problems


def _payment_id(payment: Mapping[str, Any]) -> str:
    return str(payment.get("id"))


async def audit(
    intents: Sequence[Intent],
    outcomes: Mapping[int, Outcome],
    ledger: Ledger,
    *,
    charges: Mapping[str, Sequence[str]] | None = None,
    concurrency: int = 16,
) -> AuditReport:
    """Check every intent against the ledger (and the card network's ``charges``, if given)."""
    report = AuditReport(intents=len(intents))
    gate = asyncio.Semaphore(concurrency)

    async def check(intent: Intent) -> None:
        async with gate:
            found = await ledger.payments(intent.tenant, intent.customer)
        where = f"intent {intent.number} ({intent.customer})"
        outcome = outcomes.get(intent.number, Outcome())
        report.answers.extend(outcome.problems)
        if outcome.status is None:
            report.answers.append(f"{where}: no final answer")
        elif outcome.status != intent.final_status:
            report.inconsistent.append(
                f"{where}: final answer {outcome.status}, expected {intent.final_status}"
            )
        if charges is not None:
            charged = list(charges.get(intent.customer, ()))
            report.charges += len(charged)
            if charged != [intent.charge_outcome]:
                report.charged.append(
                    f"{where}: card network charges {charged}, expected [{intent.charge_outcome}]"
                )
        if not found:
            report.lost.append(f"{where}: lost: no payment in the ledger")
            return
        if len(found) > 1:
            listed = ", ".join(f"{_payment_id(p)} {p.get('status')}" for p in found)
            report.duplicates.append(f"{where}: {len(found)} payments: {listed}")
            return
        payment = found[0]
        want = (intent.amount, intent.currency, intent.customer, intent.ledger_status)
        got = tuple(payment.get(k) for k in ("amount", "currency", "customer", "status"))
        if got != want:
            report.wrong.append(f"{where}: the ledger has {got}, intended {want}")
        told = sorted(outcome.ids_seen - {_payment_id(payment)})
        if told:
            report.inconsistent.append(
                f"{where}: clients were told {told}, the ledger has {_payment_id(payment)}"
            )
        elif outcome.status is not None and outcome.payment_id is None:
            report.inconsistent.append(f"{where}: the final answer named no payment")

    await asyncio.gather(*(check(intent) for intent in intents))
    intended = {(i.tenant, i.customer) for i in intents}
    for tenant in sorted({i.tenant for i in intents}):
        every = await ledger.payments(tenant)
        report.payments += len(every)
        for payment in every:
            if (tenant, payment.get("customer")) not in intended:
                report.strays.append(f"a payment nobody intended: {payment}")
    for problems in (report.duplicates, report.lost, report.wrong, report.inconsistent):
        problems.sort()
    return report
