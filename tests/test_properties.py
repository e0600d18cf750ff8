"""Properties over random keys, headers and bodies, through the middleware on a memory store.

- The middleware itself never answers 5xx and never raises: every request gets one whole answer.
- A (tenant, key) never runs the app twice, whatever the payloads, methods and interleavings.
- Equivalent JSON documents share a fingerprint; different ones do not.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from oncely import MalformedKey, fingerprint, parse_key, single_tenant, tenant_from_header
from oncely.asgi import IdempotencyMiddleware

Message = MutableMapping[str, Any]

PROPERTY_SETTINGS = settings(max_examples=75, deadline=None)


# Requests -----------------------------------------------------------------------------------

visible = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
valid_keys = st.text(alphabet=visible, min_size=1, max_size=255)


def sf_string(key: str) -> bytes:
    return b'"' + key.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


# Header values for a key: the two valid forms, then anything at all (mostly malformed).
good_keys = st.one_of(valid_keys.map(str.encode), valid_keys.map(sf_string))
any_keys = st.one_of(
    good_keys,
    st.text(alphabet=visible, min_size=256, max_size=300).map(str.encode),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)

content_types = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/problem+json",
        None,
        b"application/x-www-form-urlencoded",
        b"text/plain",
        b"multipart/form-data; boundary=x",
        b"\xff\xfe",
    ]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


def nest(depth: int, as_object: bool) -> bytes:
    if as_object:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"]" * depth


nested_json = st.builds(nest, st.sampled_from(range(1, 1501)), st.booleans())

bodies = st.one_of(
    nested_json,
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4).map(
        lambda d: "&".join(f"{k}={v}" for k, v in d.items()).encode("utf-8", "surrogatepass")
    ),
    st.just(b"x" * 5000),  # over the request limit used below
)

junk_headers = st.lists(
    st.tuples(
        st.binary(min_size=1, max_size=12).map(bytes.lower),
        st.binary(max_size=30),
    ),
    max_size=4,
)


@dataclass(frozen=True)
class Call:
    method: str
    tenant: bytes | None
    keys: tuple[bytes, ...]
    content_type: bytes | None
    body: bytes
    chunked: bool
    query: bytes
    extra: tuple[tuple[bytes, bytes], ...]

    def scope(self) -> Message:
        headers: list[tuple[bytes, bytes]] = [(b"idempotency-key", k) for k in self.keys]
        if self.tenant is not None:
            headers.append((b"x-tenant-id", self.tenant))
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type))
        if not self.chunked:
            headers.append((b"content-length", str(len(self.body)).encode()))
        headers.extend(self.extra)
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": self.method,
            "path": "/things",
            "raw_path": b"/things",
            "query_string": self.query,
            "headers": headers,
        }


# What may be wrong with a request (None: nothing; it is a well-formed keyed request).
FAULTS = [None, None, None, None, "method", "no-key", "two-keys", "bad-key", "no-tenant", "blank"]


@st.composite
def calls(draw: st.DrawFn, keys: list[bytes], payloads: list[bytes]) -> Call:
    """One request whose key, tenant and body come from small pools, so that they repeat."""
    fault = draw(st.sampled_from(FAULTS))
    methods = ["GET", "PUT", "DELETE", "OPTIONS"] if fault == "method" else ["POST", "PATCH"]
    key = draw(st.sampled_from(keys))
    key_headers: tuple[bytes, ...] = (key,)
    if fault == "no-key":
        key_headers = ()
    elif fault == "two-keys":
        key_headers = (key, draw(st.sampled_from(keys)))
    elif fault == "bad-key":
        key_headers = (draw(any_keys),)
    tenant: bytes | None = draw(st.sampled_from([b"tenant-a", b"tenant-b"]))
    if fault == "no-tenant":
        tenant = None
    elif fault == "blank":
        tenant = b" \t "
    return Call(
        method=draw(st.sampled_from(methods)),
        tenant=tenant,
        keys=key_headers,
        content_type=draw(content_types),
        body=draw(st.sampled_from(payloads)),
        chunked=draw(st.booleans()),
        query=draw(st.sampled_from([b"", b"a=1", b"a=1&b=%zz", b"\xff=\xfe"])),
        extra=tuple(draw(junk_headers)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> list[list[Call]]:
    """Batches of requests; the requests of one batch run concurrently."""
    keys = draw(st.lists(good_keys, min_size=1, max_size=3))
    payloads = draw(st.lists(bodies, min_size=1, max_size=3))
    batch = st.lists(calls(keys, payloads), min_size=1, max_size=6)
    return draw(st.lists(batch, min_size=1, max_size=5))


# The app and the exchange -------------------------------------------------------------------


class CountingApp:
    """Answers 201 or 400 (both kept) and counts its runs by (tenant, parsed key)."""

    def __init__(self) -> None:
        self.runs: collections.Counter[tuple[str, str]] = collections.Counter()

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = dict(scope["headers"])
        if scope["method"] in ("POST", "PATCH"):
            tenant = headers.get(b"x-tenant-id", b"").decode("latin-1")
            self.runs[(tenant, parse_key(headers[b"idempotency-key"]))] += 1
        await asyncio.sleep(0)  # let concurrent duplicates interleave
        status = 400 if len(body) % 2 else 201
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ran:" + body[:50], "more_body": True})
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def exchange(mw: IdempotencyMiddleware, call: Call) -> list[Message]:
    """Send one request through the middleware; every message it sends back."""
    pieces = [call.body[i : i + 64] for i in range(0, len(call.body), 64)] if call.chunked else []
    messages: list[Message] = (
        [{"type": "http.request", "body": p, "more_body": True} for p in pieces]
        if call.chunked
        else []
    )
    messages.append({"type": "http.request", "body": b"" if call.chunked else call.body})
    queue = iter(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        for message in queue:
            return message
        await asyncio.Event().wait()  # no more body: wait, as a connected client does
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await mw(call.scope(), receive, send)
    return sent


def whole_answer(sent: list[Message]) -> int:
    """The status of one complete answer: a start, then body messages ending the body."""
    assert sent, "no answer at all"
    assert sent[0]["type"] == "http.response.start"
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    assert len(sent) >= 2
    assert not sent[-1].get("more_body", False)
    assert all(m.get("more_body", False) for m in sent[1:-1])
    status: int = sent[0]["status"]
    return status


def is_protected_key(call: Call) -> bool:
    if call.method not in ("POST", "PATCH") or len(call.keys) != 1:
        return False
    try:
        parse_key(call.keys[0])
    except MalformedKey:
        return False
    return True


# Properties ---------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(scenarios())
def test_the_middleware_never_answers_5xx_and_no_key_runs_twice(batches: list[list[Call]]) -> None:
    """Whatever arrives, each request gets one whole non-5xx answer; no (tenant, key) runs twice."""

    async def play() -> CountingApp:
        app = CountingApp()
        mw = IdempotencyMiddleware(
            app, store="memory:", tenant=tenant_from_header("X-Tenant-Id"), max_request_body=4000
        )
        for batch in batches:
            answers = await asyncio.gather(*(exchange(mw, call) for call in batch))
            for call, sent in zip(batch, answers, strict=True):
                status = whole_answer(sent)
                assert status < 500, (call, sent)
                if call.method in ("POST", "PATCH") and not is_protected_key(call):
                    assert status == 400, (call, sent)  # no key, two keys, or a malformed one
        await mw.aclose()
        return app

    app = asyncio.run(play())
    assert all(count == 1 for count in app.runs.values()), app.runs


@settings(max_examples=300, deadline=None)  # one request per example: cheap
@given(
    bodies | nested_json,
    content_types,
    st.booleans(),
    st.sampled_from([b"", b"a=1&b=%zz", b"\xff=\xfe"]),
)
def test_any_body_of_any_declared_type_gets_a_whole_answer_below_500(
    body: bytes, content_type: bytes | None, chunked: bool, query: bytes
) -> None:
    """Bodies are fingerprinted without ever failing: odd, invalid or deeply nested alike."""

    async def play() -> int:
        mw = IdempotencyMiddleware(
            CountingApp(), store="memory:", tenant=single_tenant, max_request_body=4000
        )
        call = Call("POST", None, (b"key-1",), content_type, body, chunked, query, ())
        status = whole_answer(await exchange(mw, call))
        await mw.aclose()
        return status

    status = asyncio.run(play())
    assert status in ((413,) if len(body) > 4000 else (201, 400))


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(any_keys, st.sampled_from([b"t1", b"t2"])), min_size=1, max_size=8))
def test_a_repeated_request_is_always_answered_from_the_store(
    requests: list[tuple[bytes, bytes]],
) -> None:
    """Sending each request twice in a row: the second is a replay (or 400 for a bad key)."""

    async def play() -> None:
        app = CountingApp()
        mw = IdempotencyMiddleware(app, store="memory:", tenant=tenant_from_header("X-Tenant-Id"))
        for key, tenant in requests:
            call = Call("POST", tenant, (key,), b"application/json", b"{}", False, b"", ())
            first = await exchange(mw, call)
            second = await exchange(mw, call)
            if is_protected_key(call):
                assert (b"idempotent-replayed", b"true") in second[0]["headers"]
                assert whole_answer(second) == whole_answer(first)
                assert b"".join(m.get("body", b"") for m in second[1:]) == b"".join(
                    m.get("body", b"") for m in first[1:]
                )
            else:
                assert whole_answer(first) == whole_answer(second) == 400
        await mw.aclose()

    asyncio.run(play())


# Fingerprints of equivalent JSON ------------------------------------------------------------

# Floats that are whole numbers compare as integers (1 == 1.0); keep them out of the generated
# documents so that "different as Python JSON text" means "different documents".
leaf_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | st.text(max_size=8)
)
documents = st.recursive(
    leaf_values,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=16,
)


def spell(value: object, rnd: random.Random) -> str:
    """Another spelling of the same JSON document: key order, whitespace, escapes, numbers."""
    ws = rnd.choice(["", " ", "\n", "\t ", "  \r\n"])
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        inner = f",{ws}".join(f"{ws}{spell(k, rnd)}{ws}:{ws}{spell(v, rnd)}" for k, v in items)
        return "{" + ws + inner + ws + "}"
    if isinstance(value, list):
        return "[" + ws + f"{ws},{ws}".join(spell(v, rnd) for v in value) + ws + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        if abs(value) < 2**53:
            return rnd.choice([str(value), f"{value}.0", f"{value}e0", f"{value}.00E+0"])
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=rnd.random() < 0.5)
    return json.dumps(value)


def fp(text: str) -> str:
    return fingerprint("POST", "/things", "", "application/json", text.encode("utf-8"))


@PROPERTY_SETTINGS
@given(documents, st.randoms(use_true_random=False))
def test_equivalent_json_documents_share_a_fingerprint(doc: object, rnd: random.Random) -> None:
    """Any two spellings of one document have one fingerprint."""
    assert fp(spell(doc, rnd)) == fp(json.dumps(doc))


@PROPERTY_SETTINGS
@given(documents, documents)
def test_different_json_documents_have_different_fingerprints(a: object, b: object) -> None:
    """Documents that differ (as values) never share a fingerprint."""
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
        assert fp(json.dumps(a)) != fp(json.dumps(b))
    else:
        assert fp(json.dumps(a)) == fp(json.dumps(b))
