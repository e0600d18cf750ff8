"""The decision event as hooks get it (immutable, hashes only, built cheaply), the JSON log
line's time, and the route labels kept per path."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import pickle
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Host, Mount, Route

from oncely import asgi, tenant_from_header
from oncely._keys import key_hash, tenant_hash
from oncely._observe import decisions_log, route_template
from oncely.events import DECISION_FIELDS, Decision, StoreOperation
from oncely.logs import JSONFormatter

STORAGE_KEY = "tenant-secret-1:POST:/payments:raw-key-abc"
TENANT = "tenant-secret-1"


def core_decision() -> Decision:
    ops = (StoreOperation("claim", 1700000000.5, 0.0001), StoreOperation("complete", 1.0, 0.2))
    return Decision._hashing(
        "executed", "/payments", "asgi", "memory", "POST", 1, 201, 0.2001, 0.3, 27, ops,
        STORAGE_KEY, TENANT,
    )  # fmt: skip


def test_a_core_decision_shows_hashes_of_its_key_and_tenant_and_never_the_raw_values() -> None:
    decision = core_decision()
    for shown in (repr(decision), pickle.dumps(decision)):
        text = shown if isinstance(shown, str) else shown.decode("latin-1")
        assert "raw-key-abc" not in text
        assert TENANT not in text
    assert decision.key_hash == key_hash(STORAGE_KEY)
    assert decision.tenant_hash == tenant_hash(TENANT)
    assert decision.key_hash != decision.tenant_hash
    assert "raw-key-abc" not in repr(pickle.loads(pickle.dumps(decision)).__reduce__())


def test_a_decision_compares_and_pickles_by_its_fields_and_cannot_be_changed() -> None:
    decision = core_decision()
    fields = {name: getattr(decision, name) for name in DECISION_FIELDS}
    same = Decision(**fields)
    assert same == decision
    assert hash(same) == hash(decision)
    assert pickle.loads(pickle.dumps(decision)) == decision
    assert Decision(**{**fields, "attempt": 2}) != decision
    with pytest.raises(FrozenInstanceError):
        decision.outcome = "replayed"
    with pytest.raises(FrozenInstanceError):
        del decision.route
    with pytest.raises(FrozenInstanceError):
        decision.operations[0].seconds = 0.0
    assert Decision("missing_key", "/p", "wsgi", "memory").key_hash is None
    assert repr(decision).startswith("Decision(outcome='executed', route='/payments',")


@pytest.mark.parametrize(
    "created", [1764751200.0, 1764751200.000001, 1764751200.9999996, 1764751259.5, 1e9 + 0.25]
)
def test_the_json_line_time_is_the_records_time_in_utc_iso_format(created: float) -> None:
    record = logging.makeLogRecord({"msg": "x", "created": created})
    formatter = JSONFormatter()
    for _ in range(2):  # the date and time of day kept for the second give the same answer
        line = formatter.format(record)
        assert f'"time":"{datetime.fromtimestamp(created, UTC).isoformat()}"' in line


def test_the_json_line_carries_the_traceback_and_the_stack_when_the_record_has_them() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("oncely.test-json-stack")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("plain")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", stack_info=True)
    finally:
        logger.removeHandler(handler)
    plain, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert "exception" not in plain
    assert "stack" not in plain
    assert failed["exception"].endswith("ValueError: boom")
    assert failed["stack"].startswith("Stack (most recent call last):")
    assert "test_the_json_line_carries_the_traceback" in failed["stack"]


def test_a_decision_line_goes_through_the_record_factory_and_the_loggers_filters() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    factory = logging.getLogRecordFactory()

    def tagged(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.tag = "from-the-factory"
        return record

    async def handler(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    app = asgi.IdempotencyMiddleware(
        handler, store="memory:", tenant=tenant_from_header("X-Tenant")
    )
    keep, level = Keep(), decisions_log.level
    decisions_log.addHandler(keep)
    decisions_log.setLevel(logging.INFO)
    logging.setLogRecordFactory(tagged)

    class OnlyReplays(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return getattr(record, "outcome", None) == "replayed"

    only_replays = OnlyReplays()

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Idempotency-Key": "k-1", "X-Tenant": "acme"}
            await client.post("/payments", content=b"{}", headers=headers)
            decisions_log.addFilter(only_replays)
            await client.post("/payments", content=b"{}", headers=headers)
            await client.post("/payments", content=b"{}", headers={**headers, "X-Tenant": "b"})

    try:
        asyncio.run(run())
    finally:
        logging.setLogRecordFactory(factory)
        decisions_log.removeFilter(only_replays)
        decisions_log.removeHandler(keep)
        decisions_log.setLevel(level)
    assert [r.outcome for r in seen] == ["executed", "replayed"]  # type: ignore[attr-defined]
    assert {r.tag for r in seen} == {"from-the-factory"}  # type: ignore[attr-defined]
    assert seen[1].funcName == "log_decision"
    assert seen[1].lineno > 0
    assert seen[1].key_hash == seen[0].key_hash  # type: ignore[attr-defined]
    assert seen[1].tenant_hash == tenant_hash("acme")  # type: ignore[attr-defined]


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({})


def scope(
    app: Starlette, path: str, method: str = "POST", host: str = "a.test"
) -> dict[str, object]:
    headers = [(b"host", host.encode())]
    return {"type": "http", "path": path, "root_path": "", "method": method, "headers": headers,
            "app": app, "query_string": b""}  # fmt: skip


def test_route_labels_kept_per_path_follow_the_routes_and_hosts_are_asked_each_time() -> None:
    app = Starlette(
        routes=[
            Route("/payments/{id}", ok, methods=["POST"]),
            Mount("/v2", routes=[Route("/refunds/{id}", ok, methods=["POST"])]),
        ]
    )
    for _ in range(2):
        assert route_template(scope(app, "/payments/1"), None) == "/payments/{id}"
        assert route_template(scope(app, "/payments/2"), None) == "/payments/{id}"
        assert route_template(scope(app, "/v2/refunds/9"), None) == "/v2/refunds/{id}"
        assert route_template(scope(app, "/payments/1", "GET"), "x") == "x"  # not a FULL match
        assert route_template(scope(app, "/nowhere"), None) == "unmatched"
    app.router.routes.append(Route("/nowhere", ok, methods=["POST"]))
    assert route_template(scope(app, "/nowhere"), None) == "/nowhere"

    hosts = Starlette(
        routes=[
            Host("a.test", Starlette(routes=[Route("/a", ok, methods=["POST"])])),
            Route("/b", ok, methods=["POST"]),
        ]
    )
    assert route_template(scope(hosts, "/b", host="a.test"), None) == "/b"
    assert (
        route_template(scope(hosts, "/a", host="a.test"), None) == "unmatched"
    )  # no template under a Host
    assert route_template(scope(hosts, "/b", host="c.test"), None) == "/b"
