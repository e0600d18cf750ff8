"""A Flask payments app behind oncely's WSGI middleware, for gunicorn and waitress.

Each run of the handler appends one line to ``ONCELY_TEST_LEDGER`` (O_APPEND, one write, so
lines from threads and processes never mix). The handler takes ``ONCELY_TEST_DELAY`` seconds, so
concurrent duplicates overlap it. The store is ``ONCELY_TEST_STORE`` (an SQLite file).
"""

from __future__ import annotations

import json
import os
import threading
import time

import flask

from oncely import tenant_from_header
from oncely.wsgi import IdempotencyMiddleware

LEDGER = os.environ["ONCELY_TEST_LEDGER"]
DELAY = float(os.environ.get("ONCELY_TEST_DELAY", "0.2"))

api = flask.Flask("oncely-wsgi-test")


@api.get("/health")
def health() -> flask.Response:
    return flask.Response(b"ok", 200)


@api.post("/payments")
def pay() -> flask.Response:
    payload = flask.request.get_json()
    run = {"pid": os.getpid(), "thread": threading.get_ident(), "amount": payload["amount"]}
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(run) + "\n").encode())
    finally:
        os.close(fd)
    time.sleep(DELAY)
    body = json.dumps({"id": f"pay_{os.getpid()}_{time.monotonic_ns()}", **payload})
    return flask.Response(body, 201, content_type="application/json")


api.wsgi_app = IdempotencyMiddleware(  # type: ignore[method-assign]
    api.wsgi_app,
    store=os.environ["ONCELY_TEST_STORE"],
    tenant=tenant_from_header("X-Tenant-Id"),
    lease=30,
)
app = api
