"""Client-side keys: new ones, derived ones, and checking the ones a caller sets.

A new key is a random UUID version 4 (RFC 9562 section 5.4). A derived key is
``HMAC-SHA256(secret, operation)`` laid out as a UUID version 8 (RFC 9562 section 5.8, the
version for custom layouts): the same operation gives the same key in every process, with
nothing stored, and without the secret nobody can guess it. A key the caller sets is checked
as the server checks it (oncely's own parser: 1-255 visible ASCII, bare or quoted).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

from .._errors import ConfigurationError, MalformedKey
from .._keys import parse_key

__all__ = ["KEY_FORMATS", "caller_key", "derive_key", "format_key", "key_hash", "new_key"]

KEY_FORMATS = ("token", "sf-string")


def new_key() -> str:
    """A random UUID v4, as 36 characters."""
    return str(uuid.uuid4())


def derive_key(secret: bytes, operation: str) -> str:
    """``HMAC-SHA256(secret, operation)`` as a UUID v8: stable, storage-free, unguessable."""
    digest = hmac.new(secret, operation.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    value = int.from_bytes(digest[:16], "big")
    value &= ~(0xF << 76)  # version nibble (bits 48-51 from the left)
    value |= 0x8 << 76
    value &= ~(0x3 << 62)  # variant bits (64-65 from the left): RFC 9562, 0b10
    value |= 0x2 << 62
    return str(uuid.UUID(int=value))


def format_key(key: str, key_format: str) -> str:
    """The header value for ``key``: a bare token, or the draft's sf-string (RFC 8941)."""
    if key_format == "sf-string":
        return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return key


def caller_key(values: list[str], header: str) -> str:
    """The key in the caller's own header value(s), or ConfigurationError before sending."""
    if len(values) != 1:
        raise ConfigurationError(
            f"the request has {len(values)} {header} headers; send exactly one key per request"
        )
    try:
        return parse_key(values[0])
    except MalformedKey as exc:
        raise ConfigurationError(f"{header} header: {exc.detail}") from None


def key_hash(key: str | None) -> str:
    """What logs say instead of the key: a short SHA-256 of it."""
    if key is None:
        return "-"
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
