"""The benchmark's endpoint as a Flask app, bare or behind oncely's WSGI middleware.

BENCH_TARGET=bare|oncely  BENCH_STORE=sqlite:...|postgresql://...|redis://...
BENCH_PREFIX=<schema or key prefix of this run>
"""

from __future__ import annotations

import json
import os

import flask

api = flask.Flask("bench-wsgi")


@api.post("/payments")
def create_payment() -> flask.Response:
    payment = flask.request.get_json()
    if not isinstance(payment, dict) or not isinstance(payment.get("amount"), int):
        return flask.Response(b'{"error":"invalid"}', 422, content_type="application/json")
    body = json.dumps({"id": "pay_1", "status": "succeeded", **payment}).encode()
    return flask.Response(
        body, 201, content_type="application/json", headers={"Location": "/payments/pay_1"}
    )


app = api
if os.environ.get("BENCH_TARGET") == "oncely":
    from oncely import open_store, tenant_from_header
    from oncely.wsgi import IdempotencyMiddleware

    url, prefix = os.environ["BENCH_STORE"], os.environ.get("BENCH_PREFIX", "bench")
    options = (
        {"schema": prefix}
        if url.startswith("postgres")
        else {"prefix": f"{prefix}:"}
        if url.startswith("redis")
        else {}
    )
    api.wsgi_app = IdempotencyMiddleware(  # type: ignore[method-assign]
        api.wsgi_app, store=open_store(url, **options), tenant=tenant_from_header("X-Tenant-Id")
    )
