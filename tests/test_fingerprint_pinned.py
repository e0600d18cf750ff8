"""Pinned fingerprints and storage keys: no change to the request path may alter them.

The values were computed once with the reference (pure-Python) code and written down here. A
stored record is matched against the fingerprint of its repeat and found by its storage key, so
a change to either byte string would refuse (422) or run twice every request a store already
holds. When the canonical form must change, FINGERPRINT_VERSION changes with it, and so do these.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from oncely import fingerprint, tenant_from_header
from oncely._keys import storage_key
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import AsyncMemoryStore

J = "application/json"
F = "application/x-www-form-urlencoded"

# name, method, path, query, content type, body, ignore_fields, fingerprint
FINGERPRINTS: list[tuple[str, str, str, str, str | None, bytes, tuple[str, ...], str]] = [
    (
        "post-json",
        "POST",
        "/payments",
        "",
        J,
        b'{"amount":1000,"currency":"EUR"}',
        (),
        "v1:eda8517e777a8114ba55a9eeb94b04909b2b22992a506a4d310d020cfa01f19c",
    ),
    (
        "lower-method",
        "post",
        "/payments",
        "",
        J,
        b'{"amount":1000,"currency":"EUR"}',
        (),
        "v1:eda8517e777a8114ba55a9eeb94b04909b2b22992a506a4d310d020cfa01f19c",
    ),
    (
        "patch-charset",
        "PATCH",
        "/orders/42",
        "",
        "Application/JSON; charset=utf-8",
        b'{"b":[1,2,{"z":null,"a":true}],"a":"x"}',
        (),
        "v1:0cc4f25dd24fcec00d3defa552aa8d1b141c2bf052e0e8bc225185086084360a",
    ),
    (
        "query-sorted",
        "POST",
        "/p",
        "b=2&a=1&a=0&empty=",
        J,
        b"{}",
        (),
        "v1:9b879a4aadf9c27195a7e781c725bbd7e549398490135319958d57a715f68659",
    ),
    (
        "query-encoded",
        "POST",
        "/p",
        "q=caf%C3%A9&x=a+b&y=%2F",
        None,
        b"",
        (),
        "v1:0e3f5146103bad664db5f433f2b4b101d42e365afb90a39f361fa0912d7955b8",
    ),
    (
        "unicode",
        "POST",
        "/p",
        "",
        J,
        '{"name":"caf\\u00e9 \u2603 \U0001f600","k\u00e9y":"\u00fc"}'.encode(),
        (),
        "v1:9a9c5136df79b866882650dc2c9f3a91002e32dd2bea16eaa7e35cfab06a11be",
    ),
    (
        "floats",
        "POST",
        "/p",
        "",
        J,
        b'{"a":1.0,"b":1e0,"c":0.1,"d":-2.5e-7,"e":123456789012345678901234567890,"f":1.5e300,"g":-0.0}',
        (),
        "v1:c614de940be32a93f0635a00c1e98d5f71451543622c2514f509e4e2c42ae55c",
    ),
    (
        "nesting",
        "POST",
        "/p",
        "",
        J,
        b'{"a":{"b":{"c":{"d":[[[{"e":[1,[2,[3]]]}]]]}}}}',
        (),
        "v1:dc0c6c121d6e02ad9f88a840b8225b28495ba0ed3415f2c4e5f4a8654fdb37f0",
    ),
    (
        "json-array",
        "PUT",
        "/p",
        "",
        "application/vnd.api+json",
        b'[3,1,2,{"y":1,"x":2}]',
        (),
        "v1:fbddfba0395206d405be2c637eba42019803d08642dce687f9bffc5b38f03c2f",
    ),
    (
        "ignore-fields",
        "POST",
        "/p",
        "",
        J,
        b'{"amount":5,"meta":{"trace":"t1","keep":1},"nonce":"n"}',
        ("nonce", "meta.trace", "missing.deep"),
        "v1:1df495b261e545bdc1799ca87f0e99c5baa3526b19cfb95a9660850e63d47696",
    ),
    (
        "not-json",
        "POST",
        "/p",
        "",
        J,
        b'{"amount": 5',
        (),
        "v1:0fcd6abaabef3df5b069f4bed0978257d2cd236a968aedd02d14dd7f7c58f73c",
    ),
    (
        "json-nan",
        "POST",
        "/p",
        "",
        J,
        b'{"a":NaN}',
        (),
        "v1:04a2161916c9b72a58aad1f274b442a23d9ae9985e762111dda013cefefb8e33",
    ),
    (
        "json-huge",
        "POST",
        "/p",
        "",
        J,
        b'{"a":1e400}',
        (),
        "v1:02fcb0ecd8e128f8cd3de07fd0ac2224a2f6245e87f333b63fab67a5ac906e70",
    ),
    (
        "form",
        "POST",
        "/login",
        "",
        F,
        b"user=J%C3%BCrgen&b=2&a=1&a=0&empty=&csrf=x",
        ("csrf",),
        "v1:945541443e7627133c3c4def9b55d6f05f762d5b1ab03b0588fe18fddfae0791",
    ),
    (
        "form-bad-utf8",
        "POST",
        "/login",
        "",
        F,
        b"user=\xff",
        (),
        "v1:1293da5247715f9479150373ac53490053bc58eb5fe7c068676f903d3f6b0cd3",
    ),
    (
        "bytes",
        "POST",
        "/upload",
        "",
        "application/octet-stream",
        bytes(range(256)),
        (),
        "v1:8c2b90726bb61cc2000569f946ba6398fc5bb6488f3690a829031a9cdba952ff",
    ),
    (
        "text",
        "POST",
        "/upload",
        "z=1",
        "text/plain",
        b"hello",
        (),
        "v1:7acdd16d6db6ce434e08da0c3821051d6eca1f72bebad868c841977096c5df7f",
    ),
    (
        "empty",
        "DELETE",
        "/p/1",
        "",
        None,
        b"",
        (),
        "v1:841aefe548dc25d45273c14bd72f3405262e14ee21e4d1fc59ae74b0f191e599",
    ),
    (
        "surrogate-path",
        "POST",
        "/p/\udcff",
        "q=\udcff",
        J,
        b'{"s":"\\ud800"}',
        (),
        "v1:b83ab59df499fc04bc1c4bf1787c9b1a88b3f833290c3ddcf47253f837651ab2",
    ),
]

# namespace, tenant, key, storage key
STORAGE_KEYS = [
    (
        "",
        "tenant-a",
        "8e03978e-40d5-43e8-bc93-6894a57f9324",
        "d3629281fe073b9fa70d040f2c5dbe24d55f52a0275b800c4187579568886e94",
    ),
    (
        "",
        "tenant-b",
        "8e03978e-40d5-43e8-bc93-6894a57f9324",
        "c39da548de1d71cc7ec8127920783f75863d7af2f136f413a6305160f8d705cb",
    ),
    ("payments", "t", "k", "9ff35e7fa93e82cc5ff1d8b10e6b8ed7271d0c0935f467cb24394be4d37faa3e"),
    ("", "", "x", "fa593fe698eb8b14903971a854970a5b58785793906f07fa1409ee48ac999e7c"),
    (
        "ns",
        "ténänt",
        "~!@#$%^&*()",
        "8f4eba43c67142c8243a4a400406bb80bbba9dac02f1a96073403514e1847e5d",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "content_type", "body", "ignore", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in FINGERPRINTS],
)
def test_fingerprint_is_pinned(
    method: str,
    path: str,
    query: str,
    content_type: str | None,
    body: bytes,
    ignore: tuple[str, ...],
    expected: str,
) -> None:
    assert fingerprint(method, path, query, content_type, body, ignore) == expected


@pytest.mark.parametrize(("namespace", "tenant", "key", "expected"), STORAGE_KEYS)
def test_storage_key_is_pinned(namespace: str, tenant: str, key: str, expected: str) -> None:
    assert storage_key(tenant, key, namespace) == expected


async def _ok(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _through_middleware(
    method: str,
    path: str,
    query: str,
    content_type: str | None,
    body: bytes,
    ignore: tuple[str, ...],
) -> tuple[str, str]:
    """(storage key, fingerprint) of the record the ASGI middleware keeps for one request."""
    store = AsyncMemoryStore()
    mw = IdempotencyMiddleware(
        _ok,
        store=store,
        tenant=tenant_from_header("X-Tenant-Id"),
        methods=[method.upper()],
        ignore_fields=ignore,
    )
    headers = [
        (b"idempotency-key", b'"8e03978e-40d5-43e8-bc93-6894a57f9324"'),
        (b"x-tenant-id", b"tenant-a"),
    ]
    if content_type is not None:
        headers.append((b"Content-Type", content_type.encode("latin-1")))
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode("utf-8", "surrogateescape"),
        "headers": headers,
    }
    # Two body messages: the body is fingerprinted whole, however it arrives.
    parts = [
        {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
        {"type": "http.request", "body": body[len(body) // 2 :], "more_body": False},
    ]

    async def receive() -> dict[str, Any]:
        return parts.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    async def run() -> tuple[str, str]:
        await mw(scope, receive, send)
        record = await store.get(STORAGE_KEYS[0][3])
        assert record is not None, "not kept under the pinned storage key"
        return record.key, record.fingerprint

    return asyncio.run(run())


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=case[0])
        for case in FINGERPRINTS
        if case[1].isupper() and case[2].isascii() and case[3].isascii()
    ],
)
def test_middleware_keeps_the_pinned_fingerprint_and_key(
    case: tuple[str, str, str, str, str | None, bytes, tuple[str, ...], str],
) -> None:
    _, method, path, query, content_type, body, ignore, expected = case
    key, fp = _through_middleware(method, path, query, content_type, body, ignore)
    assert key == STORAGE_KEYS[0][3]
    assert fp == expected
