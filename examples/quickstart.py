"""The README's quick start, runnable as is: one payment endpoint, sent three times."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from oncely import tenant_from_header
from oncely.asgi import IdempotencyMiddleware

charges = itertools.count(1)


async def create_payment(request: Request) -> JSONResponse:
    payment = await request.json()
    payment_id = f"pay_{next(charges)}"  # the side effect we must not repeat
    return JSONResponse({"id": payment_id, **payment}, status_code=201)


app = IdempotencyMiddleware(
    Starlette(routes=[Route("/payments", create_payment, methods=["POST"])]),
    store="memory:",
    tenant=tenant_from_header("X-Tenant-Id"),
)


async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        headers = {"Idempotency-Key": str(uuid.uuid4()), "X-Tenant-Id": "acme"}
        payment = {"amount": 1000, "currency": "EUR", "customer": "cus_1"}
        for attempt in (1, 2):
            r = await client.post("/payments", json=payment, headers=headers)
            replayed = r.headers.get("idempotent-replayed", "false")
            print(f"attempt {attempt}: {r.status_code} replayed={replayed} {r.text}")
        r = await client.post("/payments", json={**payment, "amount": 5}, headers=headers)
        print(f"other payload, same key: {r.status_code} {r.json()['title']}")


if __name__ == "__main__":
    asyncio.run(main())
