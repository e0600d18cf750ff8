"""The payments API: FastAPI behind oncely's IdempotencyMiddleware, behind bearer authentication.

    app = create_app(Settings(store="sqlite:payments.db"))     # an ASGI app; docs at /docs

Layers, outermost first:

1. :class:`Service`: every request but ``/health``, ``/metrics`` and the docs needs
   ``Authorization: Bearer <api key>``; any non-empty key names a tenant (a real deployment
   plugs in its own authentication). Without one: 401, before anything else runs.
2. oncely's ``IdempotencyMiddleware``, scoped by tenant: ``POST /payments``, ``POST /orders``
   and ``POST /orders/{id}/pay`` require an ``Idempotency-Key`` (400 without);
   ``PATCH /orders/{id}`` and ``PUT /orders/{id}`` are protected when they carry one.
   Two tenants' identical keys never meet.
3. The FastAPI app: validation (422 before any side effect), then the handlers, which move the
   key forward in the ledger's own transactions (see ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import Response

from oncely import (
    AsyncStore,
    Attempt,
    Claimed,
    LeaseLost,
    Route,
    State,
    current_attempt,
    open_async_store,
)
from oncely import Request as OncelyRequest
from oncely.asgi import IdempotencyMiddleware
from oncely.dashboard import Dashboard, Panel
from oncely.metrics import Metrics

from . import ledger
from .card_network import CardNetwork, CardNetworkUnavailable
from .database import Database, PostgresDatabase, SQLiteDatabase, Work
from .faults import Faults
from .models import (
    Answer,
    Order,
    OrderIn,
    OrderPatch,
    OrderReplace,
    Payment,
    PaymentIn,
    items_of,
)
from .problems import (
    PROBLEM_BASE,
    PROBLEM_TYPE,
    ApiProblem,
    encode,
    http_exception_handler,
    problem_handler,
    validation_handler,
)
from .settings import Settings

__all__ = ["Service", "create_app", "tenant_of"]

log = logging.getLogger("oncely_payments")

Message = MutableMapping[str, Any]

PUBLIC_PATHS = frozenset(
    {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
JSON = "application/json"


def tenant_of(authorization: str | None) -> str | None:
    """The tenant a ``Bearer`` API key names (a hash: the key itself is never stored)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return "ten_" + hashlib.sha256(token.encode()).hexdigest()[:32]


def _idempotency_tenant(request: OncelyRequest) -> str | None:
    return tenant_of(request.headers.get("authorization"))


def _unauthorized() -> ApiProblem:
    return ApiProblem(
        401,
        "unauthorized",
        "API key required",
        "Send your API key as 'Authorization: Bearer <api key>'.",
        headers=[("www-authenticate", 'Bearer realm="oncely-payments"')],
    )


_bearer = HTTPBearer(auto_error=False, description="Any non-empty API key names a tenant.")


def _tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    tenant = tenant_of(request.headers.get("authorization"))
    if tenant is None:
        raise _unauthorized()
    return tenant


Tenant = Annotated[str, Depends(_tenant)]
IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        description="Required. A unique value per operation (a UUID); send the same one when "
        "you retry. Repeats get the first answer back with 'Idempotent-Replayed: true'.",
    ),
]
OptionalIdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Optional: makes the change safe to retry; repeats replay the first answer.",
    ),
]
Limit = Annotated[int, Query(ge=1, le=100, description="1-100 items per page")]
Cursor = Annotated[
    str | None,
    Query(description="the id of the last item of the previous page: the next page follows it"),
]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _now() -> int:
    return int(time.time())


def _respond(answer: Answer) -> Response:
    return Response(answer.body, answer.status, headers=dict(answer.headers))


def _json(value: object, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return _respond(Answer(status, (("content-type", JSON), *headers), encode(value)))


def payment_answer(payment: Payment) -> Answer:
    """201 with the payment, or 402 (a problem that carries the failed payment)."""
    location = ("location", f"/payments/{payment.id}")
    if payment.status == "succeeded":
        return Answer(201, (("content-type", JSON), location), encode(payment.to_json()))
    body = {
        "type": PROBLEM_BASE + "card-declined",
        "title": "Card declined",
        "status": 402,
        "detail": "The card network declined this payment; it is recorded with status failed. "
        "Retrying with the same Idempotency-Key returns this answer again: to try again, use "
        "another card and a new key.",
        "decline_code": "card_declined",
        "payment": payment.to_json(),
    }
    return Answer(402, (("content-type", PROBLEM_TYPE), location), encode(body))


def order_answer(order: Order, status: int = 200) -> Answer:
    headers: tuple[tuple[str, str], ...] = (("content-type", JSON), ("etag", order.etag))
    if status == 201:
        headers += (("location", f"/orders/{order.id}"),)
    return Answer(status, headers, encode(order.to_json()))


def _taken_over() -> Response:
    return ApiProblem(
        409,
        "request-taken-over",
        "Another attempt of this request took over",
        "This attempt ran past its lease and a retry of the same request took it over; that "
        "retry's answer stands. Retry the same request to get it.",
        headers=[("retry-after", "1")],
    ).response()


IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description="Required: the ETag of the order as you last read it (412 if it "
        "has changed since, 428 if missing).",
    ),
]


def _required_if_match(if_match: str | None) -> str:
    if if_match is None:
        raise ApiProblem(
            428,
            "precondition-required",
            "If-Match required",
            "Send the order's ETag as If-Match, so a change made since you read it is "
            "never overwritten. GET the order to learn its ETag.",
        )
    return if_match


def _optional_attempt() -> Attempt | None:
    return current_attempt(required=False)


class Handlers:
    """The endpoints, over one database, one card network and the fault injector.

    ``derived_ids``: a new payment's or order's id is derived from the request's key (tenant and
    Idempotency-Key), so that a phase run again by a later attempt (or beside a stale one) finds
    the row it wrote: how a ledger apart from the store stays exactly-once (ledger.py).
    """

    def __init__(
        self,
        db: Database,
        network: CardNetwork,
        store: AsyncStore,
        faults: Faults,
        *,
        derived_ids: bool = False,
    ) -> None:
        self.db, self.network, self.store, self.faults = db, network, store, faults
        self.derived_ids = derived_ids

    def _id(self, prefix: str, attempt: Attempt) -> str:
        if not self.derived_ids:
            return _new_id(prefix)
        # downstream_key is stable for (tenant, key) across attempts: "oncely-" + 40 hex digits.
        return f"{prefix}_{attempt.downstream_key(f'ledger-{prefix}')[7:31]}"

    def _before_first_commit(self) -> None:
        self.faults.reach("before_first_commit")

    async def create_payment(
        self, payment: PaymentIn, tenant: Tenant, idempotency_key: IdempotencyKey
    ) -> Response:
        """Charge a customer's card, exactly once per Idempotency-Key."""
        attempt = current_attempt()
        pending = Payment(
            self._id("pay", attempt), payment.amount, payment.currency, payment.customer, "pending"
        )
        return await self._charge_once(ledger.create_payment(attempt, tenant, pending, _now()))

    async def pay_order(
        self, order_id: str, tenant: Tenant, idempotency_key: IdempotencyKey
    ) -> Response:
        """Pay an open order's total, exactly once: one payment, and the order marked paid."""
        attempt = current_attempt()
        return await self._charge_once(
            ledger.start_order_payment(attempt, tenant, order_id, self._id("pay", attempt), _now()),
            order=order_id,
        )

    async def _charge_once(self, phase_1: Work[Payment], order: str | None = None) -> Response:
        """Phase 1 (``phase_1``: the pending payment), the charge, phase 2; resumable."""
        attempt = current_attempt()
        try:
            if not attempt.done(ledger.PAYMENT_CREATED):
                kept = await self.db.write(phase_1, before_commit=self._before_first_commit)
                created: dict[str, Any] = {
                    "id": kept.id,
                    "amount": kept.amount,
                    "currency": kept.currency,
                    "customer": kept.customer,
                }
            else:
                phase_1.close()
                # A resumed attempt reuses the payment its first phase created, and charges it.
                created = attempt.data(ledger.PAYMENT_CREATED)
            pending = Payment(
                str(created["id"]),
                int(created["amount"]),
                str(created["currency"]),
                str(created["customer"]),
                "pending",
                order,
            )
            try:
                charge = await self.network.charge(
                    attempt.downstream_key("charge"),
                    amount=pending.amount,
                    currency=pending.currency,
                    customer=pending.customer,
                )
            except CardNetworkUnavailable as exc:
                # 5xx: oncely releases the key and keeps the recovery point; a retry resumes
                # at the charge, with the same downstream key.
                return ApiProblem(
                    503,
                    "card-network-unavailable",
                    "The card network is unavailable",
                    f"{exc}. Nothing is lost: retry the same request with the same "
                    "Idempotency-Key; it resumes where it stopped and never charges twice.",
                    headers=[("retry-after", "1")],
                ).response()
            self.faults.reach("during_charge")
            settled = replace(pending, status="succeeded" if charge.approved else "failed")
            answer = payment_answer(settled)
            await self.db.write(ledger.settle_payment(attempt, settled, charge.id, answer, _now()))
        except LeaseLost:
            return _taken_over()
        self.faults.reach("after_charge_commit")
        return _respond(answer)

    async def list_payments(
        self,
        tenant: Tenant,
        customer: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
        limit: Limit = 10,
        starting_after: Cursor = None,
    ) -> Response:
        """This API key's payments, newest first."""
        payments, more = await self.db.read(
            ledger.list_payments(
                tenant, customer=customer, limit=limit, starting_after=starting_after
            )
        )
        return _json({"data": [p.to_json() for p in payments], "has_more": more})

    async def get_payment(self, payment_id: str, tenant: Tenant) -> Response:
        payment = await self.db.read(ledger.get_payment(tenant, payment_id))
        if payment is None:
            raise ApiProblem(
                404,
                "not-found",
                "No such payment",
                f"There is no payment {payment_id} for this API key.",
            )
        return _json(payment.to_json())

    async def create_order(
        self, order: OrderIn, tenant: Tenant, idempotency_key: IdempotencyKey
    ) -> Response:
        """Create an open order; its ETag is needed to change it."""
        now = _now()
        attempt = current_attempt()
        created = Order(
            id=self._id("ord", attempt),
            customer=order.customer,
            currency=order.currency,
            items=items_of(order.items),
            status="open",
            note=order.note,
            payment=None,
            version=1,
            created=now,
            updated=now,
        )
        try:
            answer = await self.db.write(
                ledger.create_order(
                    tenant, created, attempt, functools.partial(order_answer, status=201)
                )
            )
        except LeaseLost:
            return _taken_over()
        return _respond(answer)

    async def list_orders(
        self,
        tenant: Tenant,
        status: Literal["open", "paid", "fulfilled", "cancelled"] | None = None,
        customer: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
        limit: Limit = 10,
        starting_after: Cursor = None,
    ) -> Response:
        """This API key's orders, newest first, by status and customer."""
        orders, more = await self.db.read(
            ledger.list_orders(
                tenant,
                status=status,
                customer=customer,
                limit=limit,
                starting_after=starting_after,
            )
        )
        return _json({"data": [o.to_json() for o in orders], "has_more": more})

    async def get_order(self, order_id: str, tenant: Tenant) -> Response:
        order = await self.db.read(ledger.get_order(tenant, order_id))
        if order is None:
            raise ledger.order_not_found(order_id)
        return _respond(order_answer(order))

    async def update_order(
        self,
        order_id: str,
        patch: OrderPatch,
        tenant: Tenant,
        if_match: IfMatch = None,
        idempotency_key: OptionalIdempotencyKey = None,
    ) -> Response:
        """Change an order, if it is still the version you read (If-Match)."""
        work = ledger.update_order(
            tenant,
            order_id,
            patch,
            if_match=_required_if_match(if_match),
            now=_now(),
            render=order_answer,
            attempt=_optional_attempt(),
        )
        return await self._write_order(work)

    async def replace_order(
        self,
        order_id: str,
        order: OrderReplace,
        tenant: Tenant,
        if_match: IfMatch = None,
        idempotency_key: OptionalIdempotencyKey = None,
    ) -> Response:
        """Replace an open order's content, if it is still the version you read (If-Match)."""
        work = ledger.replace_order(
            tenant,
            order_id,
            order,
            if_match=_required_if_match(if_match),
            now=_now(),
            render=order_answer,
            attempt=_optional_attempt(),
        )
        return await self._write_order(work)

    async def _write_order(self, work: Work[Answer]) -> Response:
        try:
            answer = await self.db.write(work)
        except LeaseLost:
            return _taken_over()
        return _respond(answer)

    async def delete_order(
        self,
        order_id: str,
        tenant: Tenant,
        if_match: Annotated[
            str | None,
            Header(alias="If-Match", description="Optional: delete only this version (412)."),
        ] = None,
    ) -> Response:
        """Delete an order: 204, then 404."""
        await self.db.write(ledger.delete_order(tenant, order_id, if_match=if_match, now=_now()))
        return Response(status_code=204)

    async def health(self) -> Response:
        """200 when the service, its ledger and its idempotency store answer; 503 if not."""
        try:
            async with asyncio.timeout(2.0):
                ready = await self.db.ready()
                await self.store.get("oncely-payments-health-probe")
        except Exception as exc:
            log.warning("health check failed: %r", exc)
            ready = False
        if not ready:
            return ApiProblem(
                503,
                "not-ready",
                "Not ready",
                "The service cannot reach its database yet; retry shortly.",
                headers=[("retry-after", "1")],
            ).response()
        return _json({"status": "ok"})


_PROBLEM = {"content": {PROBLEM_TYPE: {}}, "description": "a problem (RFC 9457)"}


def _link(path: str, method: str, parameter: str, *, etag: bool = False) -> dict[str, Any]:
    """An OpenAPI link: the operation at ``path`` with ``parameter`` from the response's id
    (and, with ``etag``, If-Match from its ETag)."""
    ref = "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method
    parameters = {parameter: "$response.body#/id"}
    if etag:
        parameters["header.If-Match"] = "$response.header.ETag"
    return {"operationRef": ref, "parameters": parameters}


_ORDER_LINKS = {
    f"{verb.title()}Order": _link("/orders/{order_id}", verb, "order_id", etag=verb != "get")
    for verb in ("get", "patch", "put", "delete")
} | {"PayOrder": _link("/orders/{order_id}/pay", "post", "order_id")}


def _build_api(handlers: Handlers, lifespan: Any) -> FastAPI:
    api = FastAPI(
        title="oncely payments",
        version="0.1.0",
        summary="The oncely reference payments service: every payment takes effect once.",
        docs_url="/docs",
        lifespan=lifespan,
    )
    api.add_exception_handler(ApiProblem, problem_handler)
    api.add_exception_handler(RequestValidationError, validation_handler)
    api.add_exception_handler(HTTPException, http_exception_handler)
    errors: dict[int | str, dict[str, Any]] = {code: _PROBLEM for code in (400, 401, 404, 409, 422)}
    h = handlers
    api.add_api_route(
        "/payments",
        h.create_payment,
        methods=["POST"],
        status_code=201,
        tags=["payments"],
        responses={
            **errors,
            201: {
                "description": "the payment, status succeeded",
                "links": {"GetPayment": _link("/payments/{payment_id}", "get", "payment_id")},
            },
            402: {**_PROBLEM, "description": "declined: a problem with the failed payment"},
            503: {**_PROBLEM, "description": "the card network failed: retry, same key"},
        },
    )
    api.add_api_route(
        "/payments", h.list_payments, methods=["GET"], tags=["payments"], responses=errors
    )
    api.add_api_route(
        "/payments/{payment_id}",
        h.get_payment,
        methods=["GET"],
        tags=["payments"],
        responses=errors,
    )
    api.add_api_route(
        "/orders",
        h.create_order,
        methods=["POST"],
        status_code=201,
        tags=["orders"],
        responses={**errors, 201: {"description": "the order", "links": _ORDER_LINKS}},
    )
    api.add_api_route("/orders", h.list_orders, methods=["GET"], tags=["orders"], responses=errors)
    api.add_api_route(
        "/orders/{order_id}", h.get_order, methods=["GET"], tags=["orders"], responses=errors
    )
    api.add_api_route(
        "/orders/{order_id}",
        h.update_order,
        methods=["PATCH"],
        tags=["orders"],
        responses={**errors, 412: _PROBLEM, 428: _PROBLEM},
    )
    api.add_api_route(
        "/orders/{order_id}",
        h.replace_order,
        methods=["PUT"],
        tags=["orders"],
        responses={**errors, 412: _PROBLEM, 428: _PROBLEM},
    )
    api.add_api_route(
        "/orders/{order_id}/pay",
        h.pay_order,
        methods=["POST"],
        status_code=201,
        tags=["orders"],
        responses={
            **errors,
            201: {
                "description": "the payment, status succeeded; the order is paid",
                "links": {"GetPayment": _link("/payments/{payment_id}", "get", "payment_id")},
            },
            402: {**_PROBLEM, "description": "declined: a problem with the failed payment"},
            503: {**_PROBLEM, "description": "the card network failed: retry, same key"},
        },
    )
    api.add_api_route(
        "/orders/{order_id}",
        h.delete_order,
        methods=["DELETE"],
        status_code=204,
        tags=["orders"],
        responses={**errors, 412: _PROBLEM},
    )
    api.add_api_route("/health", h.health, methods=["GET"], tags=["service"])
    return api


class Service:
    """The whole service as one ASGI app; see the module docstring for its layers."""

    def __init__(
        self,
        settings: Settings,
        idempotency: IdempotencyMiddleware,
        api: FastAPI,
        db: Database,
        network: CardNetwork,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.settings, self.idempotency, self.api = settings, idempotency, api
        self.dashboard = dashboard
        self.db, self.network = db, network
        self._closed = False

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        path = scope.get("path", "/")
        if self.dashboard is not None and (path == "/dashboard" or path.startswith("/dashboard/")):
            # Hashed keys and counts only; a real deployment puts it behind its operators' login.
            root = scope.get("root_path", "") + "/dashboard"
            await self.dashboard(
                {**scope, "root_path": root, "path": root + path[10:]}, receive, send
            )
            return
        if scope["type"] == "http" and path not in PUBLIC_PATHS:
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
            if tenant_of(authorization) is None:
                await _unauthorized().response()(scope, receive, send)
                return
        await self.idempotency(scope, receive, send)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.idempotency.aclose()
        await self.db.aclose()
        await self.network.aclose()


# Tests only (the nemesis's proof that its audit fails): the store's writes no longer check the
# fencing token, and every lease ends at once, so a duplicate takes a key over while its first
# holder runs, and the stale holder's work commits too. With a shared transaction that is the
# SQL's token check, dropped; with a store apart from the ledger (Redis) every owner write is
# made with the key's current token, read just before, so that the scripts' check passes. A
# ledger apart from the store does not rest on fencing alone (its writes are idempotent by
# themselves: create_app turns the derived ids off too, or there would be nothing to find).
UNFENCED_ENV = "ONCELY_PAYMENTS_UNFENCED"
_TOKEN_CHECK = re.compile(r"\s*AND token = (?::token|%\(token\)s)")


def _unfence(store: AsyncStore) -> None:
    log.warning("%s=1: fencing is OFF (tests only): stale lease holders can write", UNFENCED_ENV)
    phase, complete = (
        getattr(store, "phase_statement", None),
        getattr(store, "complete_statement", None),
    )
    if phase is not None and complete is not None:

        def phase_statement(*args: Any, **kwargs: Any) -> tuple[str, Any]:
            sql, params = phase(*args, **kwargs)
            return _TOKEN_CHECK.sub("", sql), params

        def complete_statement(*args: Any, **kwargs: Any) -> tuple[str, Any]:
            sql, params = complete(*args, **kwargs)
            return _TOKEN_CHECK.sub("", sql), params

        setattr(store, "phase_statement", phase_statement)  # noqa: B010
        setattr(store, "complete_statement", complete_statement)  # noqa: B010
    else:
        for name in ("complete", "release", "renew", "record_phase"):
            setattr(store, name, _as_current_owner(store, getattr(store, name)))

    claim = store.claim

    async def short_claim(key: str, fingerprint: str, *, lease: float) -> Any:
        # Every claim's lease ends at once (a microsecond: a duplicate claimed in the same store
        # batch, microseconds later, takes over too): a duplicate or a retry takes the key over
        # while the first holder still runs, which only fencing can stop.
        return await claim(key, fingerprint, lease=1e-6)

    setattr(store, "claim", short_claim)  # noqa: B010


def _as_current_owner(
    store: AsyncStore, write: Callable[..., Awaitable[bool]]
) -> Callable[..., Awaitable[bool]]:
    """``write`` (an owner write: complete, release, renew, record_phase) made with the token of
    whoever owns the key now, so that a stale holder's write lands (tests only)."""

    async def unfenced(claim: Claimed, *args: Any, **kwargs: Any) -> bool:
        record = await store.get(claim.key)
        if record is not None and record.state is State.IN_FLIGHT:
            claim = replace(claim, token=record.token)
        return await write(claim, *args, **kwargs)

    return unfenced


def create_app(settings: Settings) -> Service:
    """The payments service for ``settings``, as an ASGI app (run it with one process)."""
    database = settings.database
    shared = settings.shares_transaction
    db: Database
    store_options: dict[str, Any] = {}
    if database is None:
        db = PostgresDatabase(
            settings.ledger_url,
            schema=ledger.schema("postgresql", settings.schema),
            options=f"-c search_path={settings.schema}",
            shares_store_transaction=shared,
        )
    else:
        db = SQLiteDatabase(
            database, schema=ledger.schema("sqlite"), shares_store_transaction=shared
        )
    if settings.store_dialect == "postgresql":
        # Shared: oncely's table and the ledger's in one schema of one database.
        store_options["schema"] = settings.schema
    elif settings.store_dialect == "redis":
        store_options["prefix"] = settings.store_prefix
    network = CardNetwork(
        settings.card_network_path,
        latency_ms=settings.card_latency_ms,
        failure_rate=settings.card_failure_rate,
    )
    store = open_async_store(settings.store, **store_options)
    unfenced = os.environ.get(UNFENCED_ENV) == "1"
    if unfenced:
        _unfence(store)
    # Apart from the store, a phase may run again: ids derived from the key make it find its row.
    derived_ids = not shared and not unfenced
    handlers = Handlers(db, network, store, Faults(settings), derived_ids=derived_ids)
    service: Service | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Create the tables now if the database answers; /health tells when it does.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                if not await db.ready():
                    log.warning("the ledger database does not answer yet")
        yield
        if service is not None:
            await service.aclose()

    api = _build_api(handlers, lifespan)
    # Prometheus metrics of every idempotency decision, on a registry of this app's own.
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry, store=store)

    async def metrics_page() -> Response:
        await metrics.refresh()  # the in-flight gauge, when the store can say
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api.add_api_route("/metrics", metrics_page, methods=["GET"], include_in_schema=False)
    dashboard = Dashboard(store=store, panels=_demo_panels(settings, db))
    idempotency = IdempotencyMiddleware(
        api,
        tenant=_idempotency_tenant,
        store=store,
        on_decision=[metrics, dashboard.record],
        methods=("POST", "PATCH"),
        routes=[
            Route("/orders/{order_id}", methods=["PATCH", "PUT"], required=False),
            Route("/orders/{order_id}/pay", methods=["POST"]),
        ],
        ttl=settings.ttl,
        lease=settings.lease,
        retry_after=1.0,
    )
    service = Service(settings, idempotency, api, db, network, dashboard)
    return service


def _demo_panels(settings: Settings, db: Database) -> dict[str, Panel]:
    """The ledger audit panel, while the demo runs: what it intended (its status file) against
    what the ledger recorded."""
    if settings.demo_status is None:
        return {}
    status = Path(settings.demo_status)

    async def audit_panel() -> dict[str, Any]:
        try:
            demo: dict[str, Any] = json.loads(await asyncio.to_thread(status.read_text, "utf-8"))
        except (OSError, ValueError):
            demo = {}
        counts = await db.read(ledger.audit_counts())
        return {
            "payments_intended": demo.get("intended", "-"),
            "answered_so_far": demo.get("finished", "-"),
            "payments_recorded": counts["recorded"],
            "duplicates": counts["duplicates"],
            "audit": demo.get("audit", "runs at the end"),
        }

    return {"ledger audit (demo)": audit_panel}
