"""schemathesis against the service's own OpenAPI schema, served by uvicorn, with a valid
Bearer key and a fresh Idempotency-Key on every request: no 5xx, and every response conforms
to the schema (status code, content type, body).

``ONCELY_SCHEMA_EXAMPLES`` sets the examples per operation (25 by default, for ``make test``).
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from oncely_payments import Settings, create_app

EXAMPLES = int(os.environ.get("ONCELY_SCHEMA_EXAMPLES", "25"))
TOKEN = "sk_schema_" + secrets.token_hex(8)


def _serve() -> str:
    tmp = Path(tempfile.mkdtemp(prefix="oncely-schema-"))
    app = create_app(
        Settings(
            store=f"sqlite:{tmp / 'payments.db'}",
            card_network_db=str(tmp / "network.db"),
            card_latency_ms=0,
            lease=5,
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


BASE = _serve()
schema = schemathesis.openapi.from_url(f"{BASE}/openapi.json")
# Valid requests, so the stateful run gets past POST and follows the links it creates.
schema.config.generation.update(modes=[GenerationMode.POSITIVE], allow_extra_parameters=False)


# What the service promises: no 5xx for anything a client sends, and every answer as declared.
# (Not checked: that a schema-valid request is always accepted, since a 404 for a made-up id,
# 428 without If-Match and 422 for a business rule are the right answers; and that any Bearer key
# is a tenant, which is how the reference service names tenants.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": str(uuid.uuid4())}


@schema.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
def test_operations(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(headers=_headers(), checks=CHECKS)


STATEFUL_STEPS = int(os.environ.get("ONCELY_SCHEMA_STEPS", "10"))


class Workflows(schema.as_state_machine()):  # type: ignore[misc]
    """Stateful: follow the links (a created order to GET/PATCH/PUT/DELETE/pay it with its
    ETag, a payment to GET it), each call with the valid key and a fresh Idempotency-Key."""

    def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
        return {"headers": _headers()}

    def validate_response(self, response: Any, case: schemathesis.Case[Any], **kwargs: Any) -> None:
        case.validate_response(response, checks=CHECKS)


TestWorkflows = Workflows.TestCase
TestWorkflows.settings = settings(
    max_examples=STATEFUL_STEPS,
    stateful_step_count=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
