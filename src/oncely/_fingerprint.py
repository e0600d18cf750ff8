"""Request fingerprints: did this key come back with the same request?

fingerprint = hash(version, method, path, normalized query, media type, canonical body)

- JSON bodies (``application/json``, ``*/*+json``) are canonicalized in the spirit of RFC 8785:
  object keys sorted, no insignificant whitespace, numbers by value (``1``, ``1.0`` and ``1e0``
  are one number), strings by their characters (``"\\u00e9"`` and ``"é"`` agree).
- Form bodies (``application/x-www-form-urlencoded``) become their sorted, decoded pairs.
- Any other body is taken as bytes. A body that claims JSON but does not parse is taken as bytes.
- Chosen fields (``ignore_fields``, dotted paths for nested JSON objects) are left out.

The result is ``"v1:" + sha256 hex``; the version changes whenever the canonical form does, so a
stored fingerprint is never compared with one made by other rules by mistake.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl, urlencode

__all__ = ["FINGERPRINT_VERSION", "canonical_json", "fingerprint", "normalize_query"]

FINGERPRINT_VERSION = "v1"


def media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    known = _MEDIA_TYPES.get(content_type)
    if known is None:
        known = content_type.split(";", 1)[0].strip().lower()
        if len(_MEDIA_TYPES) < 1000:  # a client may send any value: a bounded memo
            _MEDIA_TYPES[content_type] = known
    return known


_MEDIA_TYPES: dict[str, str] = {}


def _is_json(mt: str) -> bool:
    return mt == "application/json" or mt.endswith("+json")


def normalize_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    # surrogatepass, as for every other part: a str from Python code may hold a lone surrogate.
    return urlencode(sorted(pairs), encoding="utf-8", errors="surrogatepass")


def _number(text: str) -> object:
    """A JSON number with a fraction or exponent, as RFC 8785 compares it: an IEEE double.

    1 == 1.0 == 1e0, so an integral value becomes an int. A number too large for a double
    (1e400) is no number this canonical form can tell apart: the body is taken as bytes.
    """
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a JSON number out of the range of a double")
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# Made once per process: json.loads and json.dumps with options build a new decoder or encoder
# on every call. These do exactly what json.loads(body, parse_float=..., parse_constant=...) and
# json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) do.
_DECODER = json.JSONDecoder(parse_float=_number, parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# The C encoder that _ENCODER.encode builds on every call, built once: without the circular
# check (a parsed document cannot refer to itself; nesting too deep still raises RecursionError)
# it needs no state between calls. Its output is _ENCODER.encode's, byte for byte.
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(
        None,
        _ENCODER.default,
        json.encoder.encode_basestring,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        True,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
)
_detect_encoding = json.detect_encoding


def _loads(body: bytes) -> object:
    # Numbers are normalized as they are parsed, so no second walk over the document.
    # As json.loads reads bytes: UTF-8, -16 or -32 by its first bytes (a UTF-8 BOM skipped).
    # A document that opens with "{" or "[" and no NUL next has no BOM and is UTF-8 (what
    # detect_encoding says of it, without its checks).
    if body[:1] in _OPENERS and body[1:2] != b"\0":
        return _decode(body.decode("utf-8", "surrogatepass"))
    return _decode(body.decode(_detect_encoding(body), "surrogatepass"))


_OPENERS = (b"{", b"[")
_scan: Callable[[str, int], tuple[object, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_space: Callable[[str, int], re.Match[str]] = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]


def _decode(text: str) -> object:
    """``_DECODER.decode(text)``, its two calls in between left out (the same document, the
    same errors as ValueError)."""
    start = 0 if text[:1] in "{[" and text else _space(text, 0).end()
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    if end != len(text) and _space(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def canonical_json(body: bytes) -> bytes | None:
    """The canonical form of a JSON document, or None when it is not JSON."""
    try:
        return _dump(_loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _dump(value: object) -> bytes:
    if _C_ENCODER is None or not isinstance(value, (dict, list)):
        return _ENCODER.encode(value).encode("utf-8", "surrogatepass")
    return "".join(_C_ENCODER(value, 0)).encode("utf-8", "surrogatepass")


def _drop_path(value: object, path: list[str]) -> None:
    if not isinstance(value, dict) or not path:
        return
    head, rest = path[0], path[1:]
    if not rest:
        value.pop(head, None)
    else:
        _drop_path(value.get(head), rest)


def _canonical_body(mt: str, body: bytes, ignore: tuple[str, ...]) -> tuple[str, bytes]:
    if not body:
        return "empty", b""
    if _is_json(mt):
        try:
            # Nesting that json.loads accepts can still be too deep to normalize or dump.
            value = _loads(body)
            for field in ignore:
                _drop_path(value, field.split("."))
            return "json", _dump(value)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return "bytes", body
    if mt == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes", body
        pairs = [(k, v) for k, v in parse_qsl(text, keep_blank_values=True) if k not in ignore]
        return "form", _dump(sorted(pairs))
    return "bytes", body


def _part(text: str) -> bytes:
    encoded = text.encode("utf-8", "surrogatepass")
    return len(encoded).to_bytes(4, "big") + encoded


# The first hashed parts (version, method, path) by (version, method, path): a route's requests
# share them. Bounded, as paths with ids in them are unbounded.
_HEADS: dict[tuple[str, str, str], bytes] = {}
_KIND_PARTS = {kind: _part(kind) for kind in ("empty", "json", "form", "bytes")}
_EMPTY_PART = _part("")


def fingerprint(
    method: str,
    path: str,
    query: str,
    content_type: str | None,
    body: bytes,
    ignore_fields: Iterable[str] = (),
) -> str:
    """The versioned fingerprint of a request; equal for requests that mean the same."""
    ignore = ignore_fields if type(ignore_fields) is tuple else tuple(ignore_fields)
    kind, canonical = _canonical_body(media_type(content_type), body, ignore)
    version = FINGERPRINT_VERSION
    head = _HEADS.get((version, method, path))
    if head is None:
        head = _part(version) + _part(method.upper()) + _part(path)
        if len(_HEADS) < 10_000:
            _HEADS[(version, method, path)] = head
    # One pass of the hash over: each part with its length (4 bytes), then the body's (8).
    data = b"".join(
        (
            head,
            _part(normalize_query(query)) if query else _EMPTY_PART,
            _KIND_PARTS[kind],
            len(canonical).to_bytes(8, "big"),
            canonical,
        )
    )
    return f"{version}:{hashlib.sha256(data).hexdigest()}"
