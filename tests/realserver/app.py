"""The app the real-server tests run under uvicorn: a payment endpoint behind oncely.

Configured by environment variables, so that every uvicorn process (and worker) builds the same app:

- ``ONCELY_TEST_STORE``: the store URL (``sqlite:/tmp/.../oncely.db``)
- ``ONCELY_TEST_STORE_OPTIONS``: a JSON object of options for ``open_async_store`` (a PostgreSQL
  schema, a Redis key prefix, connect and socket timeouts, pool sizes)
- ``ONCELY_TEST_STORE_TIMEOUT``: the middleware's ``store_timeout`` in seconds (default 5)
- ``ONCELY_TEST_LEDGER``: a file every handler run appends a line to (one ``write`` on a file
  opened with ``O_APPEND``, so lines from many processes never interleave and survive SIGKILL)
- ``ONCELY_TEST_LEASE``: the lease in seconds (default 60)
- ``ONCELY_TEST_DELAY``: seconds the handler sleeps before it answers (default 0); a request
  whose JSON body has ``"delay"`` sleeps that long instead
- ``ONCELY_TEST_HOLD``: a path; while that file exists the handler waits before it answers
- ``ONCELY_TEST_NAME``: a label for this server, written to the ledger and the response

``POST /payments`` answers 201 with a new payment id in the body and in ``Location``. Its ledger
lines carry the number of the attempt that holds the key (``attempt``; null would mean the
handler ran without a claim).
``GET /health`` is not protected and answers with the process id.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from oncely import OncelyError, current_attempt, open_async_store, tenant_from_header
from oncely.asgi import IdempotencyMiddleware

STORE = os.environ.get("ONCELY_TEST_STORE", "memory:")
STORE_OPTIONS = json.loads(os.environ.get("ONCELY_TEST_STORE_OPTIONS") or "{}")
STORE_TIMEOUT = float(os.environ.get("ONCELY_TEST_STORE_TIMEOUT") or "5")
LEDGER = os.environ.get("ONCELY_TEST_LEDGER", "")
LEASE = float(os.environ.get("ONCELY_TEST_LEASE", "60"))
DELAY = float(os.environ.get("ONCELY_TEST_DELAY", "0"))
HOLD = os.environ.get("ONCELY_TEST_HOLD", "")
NAME = os.environ.get("ONCELY_TEST_NAME", "server")
HOLD_LIMIT = 120.0
HOLD_POLL = 0.02


def held() -> bool:
    return bool(HOLD) and os.path.exists(HOLD)


def attempt_number() -> int | None:
    """The number of the claim this request runs under; None when it runs without one."""
    try:
        return current_attempt().number
    except OncelyError:
        return None


def record(event: str, key: str, payment_id: str) -> None:
    """Append one line to the ledger, durably enough to outlive a SIGKILL of this process."""
    if not LEDGER:
        return
    line = {
        "event": event,
        "key": key,
        "id": payment_id,
        "attempt": attempt_number(),
        "server": NAME,
        "pid": os.getpid(),
        "at": time.time(),
    }
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def create_payment(request: Request) -> JSONResponse:
    payload = await request.json()
    key = request.headers.get("idempotency-key", "")
    payment_id = "pay_" + uuid.uuid4().hex
    record("start", key, payment_id)
    delay = float(payload.get("delay", DELAY))
    if delay:
        await asyncio.sleep(delay)
    for _ in range(int(HOLD_LIMIT / HOLD_POLL)):
        if not held():
            break
        await asyncio.sleep(HOLD_POLL)
    record("end", key, payment_id)
    return JSONResponse(
        {
            "id": payment_id,
            "amount": payload.get("amount"),
            "currency": payload.get("currency"),
            "server": NAME,
            "pid": os.getpid(),
        },
        status_code=201,
        headers={"Location": f"/payments/{payment_id}"},
    )


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "server": NAME})


app = IdempotencyMiddleware(
    Starlette(
        routes=[
            Route("/payments", create_payment, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    ),
    store=open_async_store(STORE, **STORE_OPTIONS) if STORE_OPTIONS else STORE,
    tenant=tenant_from_header("X-Tenant-Id"),
    lease=LEASE,
    store_timeout=STORE_TIMEOUT,
)
