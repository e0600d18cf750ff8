"""The WSGI middleware on hand-made environs of every shape: odd REQUEST_METHOD, PATH_INFO with
any bytes as latin-1, missing or odd wsgi.input, chunked without CONTENT_LENGTH, HTTP_ headers
with odd values. Never a 5xx, never a second run, every error a documented problem+json."""

from __future__ import annotations

import collections
import io
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from oncely import tenant_from_header
from oncely.stores.memory import MemoryStore
from oncely.wsgi import IdempotencyMiddleware

from .test_asgi_hostile import DOCUMENTED

latin1 = st.binary(max_size=60).map(lambda b: b.decode("latin-1"))
# PEP 3333 requires wsgi.input; an environ without one (a test harness, a hand-made call) reads
# as an empty body: no body to fingerprint, or a 400 when CONTENT_LENGTH declares one.
INPUTS = st.one_of(st.binary(max_size=120).map(io.BytesIO), st.just(io.BytesIO()), st.none())


@settings(max_examples=200, deadline=None)
@given(
    method=st.one_of(st.sampled_from(["POST", "PATCH", "GET", "put", "FOO", ""]), latin1),
    path=latin1,
    content_length=st.one_of(st.none(), st.sampled_from(["", "0", "5", "-1", "1e3", " 7"]), latin1),
    chunked=st.booleans(),
    wsgi_input=INPUTS,
    key=st.one_of(st.none(), latin1),
    tenant=st.one_of(st.none(), latin1),
    content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"]), latin1),
    other=latin1,
)
def test_any_environ(
    method: str,
    path: str,
    content_length: str | None,
    chunked: bool,
    wsgi_input: io.BytesIO | None,
    key: str | None,
    tenant: str | None,
    content_type: str | None,
    other: str,
) -> None:
    runs: collections.Counter[tuple[str | None, str | None]] = collections.Counter()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        runs[(environ.get("HTTP_IDEMPOTENCY_KEY"), environ.get("HTTP_X_TENANT"))] += 1
        start_response("201 Created", [("X-App", "1")])
        return [b"ok"]

    mw = IdempotencyMiddleware(
        app, tenant=tenant_from_header("X-Tenant"), store=MemoryStore(), max_request_body=100
    )
    data = wsgi_input.getvalue() if wsgi_input is not None else None
    for _ in range(2):
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "h",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "HTTP_X_OTHER": other,
        }
        if data is not None:
            environ["wsgi.input"] = io.BytesIO(data)
        for name, value in (
            ("CONTENT_LENGTH", content_length),
            ("CONTENT_TYPE", content_type),
            ("HTTP_IDEMPOTENCY_KEY", key),
            ("HTTP_X_TENANT", tenant),
        ):
            if value is not None:
                environ[name] = value
        if chunked:
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
            environ.pop("CONTENT_LENGTH", None)
        statuses: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(
            status: str, headers: Any, exc_info: object = None, out: list[Any] = statuses
        ) -> Any:
            out.append((status, list(headers)))
            return lambda _: None

        body = b"".join(mw(environ, start_response))
        status, headers = statuses[0]
        code = int(status.split()[0])
        assert code < 500, (status, body)
        names = {k.lower(): v for k, v in headers}
        if "x-app" in names or "idempotent-replayed" in names:
            continue  # the app's answer, or its replay
        assert names.get("content-type") == "application/problem+json", (status, headers, body)
        problem = json.loads(body)
        assert DOCUMENTED[problem["type"]] == problem["status"] == code
    if method in ("POST", "PATCH"):
        assert all(count <= 1 for count in runs.values()), runs


def _call_without_input(
    content_length: str | None,
) -> tuple[int, dict[str, str], bytes, list[bytes]]:
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(environ["wsgi.input"].read())
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"made"]

    mw = IdempotencyMiddleware(app, tenant=tenant_from_header("X-Tenant"), store=MemoryStore())
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/things",
        "QUERY_STRING": "",
        "SERVER_NAME": "h",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "HTTP_IDEMPOTENCY_KEY": "k-1",
        "HTTP_X_TENANT": "t",
    }
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    answers: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: Any, exc_info: object = None) -> Any:
        answers.append((status, list(headers)))
        return lambda _: None

    body = b"".join(mw(environ, start_response))
    status, headers = answers[0]
    return int(status.split()[0]), {k.lower(): v for k, v in headers}, body, seen


def test_an_environ_without_wsgi_input_is_an_empty_body() -> None:
    """No wsgi.input and no CONTENT_LENGTH (or 0): the app runs once, on an empty body."""
    for length in (None, "", "0"):
        code, _, body, seen = _call_without_input(length)
        assert (code, body, seen) == (201, b"made", [b""])


def test_an_environ_without_wsgi_input_but_a_declared_body_is_a_400() -> None:
    """CONTENT_LENGTH says 5 bytes, and there is nothing to read them from: 400, nothing runs."""
    code, headers, body, seen = _call_without_input("5")
    assert code == 400
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["type"].endswith("/incomplete-request-body")
    assert (problem["received_bytes"], problem["declared_bytes"]) == (0, 5)
    assert seen == []
