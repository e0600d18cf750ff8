"""Idempotency keys: parsing the header, and the storage key.

The header value is either the IETF draft's Structured Field string (``"8e03978e-..."``,
RFC 8941 sf-string) or Stripe's bare token. Either way the key itself must be 1-255 visible
ASCII characters (``%x21-7E``). The raw key is never stored: the storage key is a hash of the
tenant and the key, so two tenants' identical keys never meet.

What logs, events, metrics and traces show of a storage key or a tenant is shorter still: a
keyed BLAKE2b hash (16 hex digits). Its key is ``ONCELY_HASH_SECRET`` when that is set (set the
same value in every process to compare hashes across workers and hosts), else random per
process; either way a hash in a log line cannot be checked against a guessed key or tenant by
someone without the secret.
"""

from __future__ import annotations

import hashlib
import os

from ._errors import MalformedKey

__all__ = ["MAX_KEY_LENGTH", "Hashed", "key_hash", "parse_key", "storage_key", "tenant_hash"]

MAX_KEY_LENGTH = 255


def _visible(text: str) -> bool:
    # ASCII, printable (%x20-7E), and no space: exactly %x21-7E.
    return text.isascii() and text.isprintable() and " " not in text


def _unquote_sf_string(value: str) -> str:
    # RFC 8941 section 4.2.5: DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE,
    # unescaped being %x20-21 / %x23-5B / %x5D-7E.
    out: list[str] = []
    i = 1
    end = len(value) - 1
    while i < end:
        ch = value[i]
        if ch == "\\":
            if i + 1 >= end or value[i + 1] not in '"\\':
                raise MalformedKey(_detail("it has a backslash that escapes nothing"))
            out.append(value[i + 1])
            i += 2
            continue
        if ch == '"':
            raise MalformedKey(_detail("it has an unescaped quote inside the string"))
        if not "\x20" <= ch <= "\x7e":
            raise MalformedKey(_detail("it has a character that is not visible ASCII"))
        out.append(ch)
        i += 1
    return "".join(out)


def _without_parameters(value: str) -> str:
    """The sf-string of an RFC 8941 Item, its parameters (``;name=value``) left aside."""
    i = 1
    while i < len(value):
        if value[i] == "\\":
            i += 2
            continue
        if value[i] == '"':
            rest = value[i + 1 :]
            if rest and not rest.lstrip(" ").startswith(";"):
                raise MalformedKey(_detail("it has text after the closing quote"))
            return value[: i + 1]
        i += 1
    raise MalformedKey(_detail("it opens a quoted string that never closes"))


def _detail(why: str) -> str:
    return (
        f"The Idempotency-Key header is malformed: {why}. Send a unique value of 1-"
        f"{MAX_KEY_LENGTH} visible ASCII characters, as a bare token or a quoted string "
        'such as "8e03978e-40d5-43e8-bc93-6894a57f9324".'
    )


def parse_key(raw: bytes | str) -> str:
    """The key in an ``Idempotency-Key`` header value, or :class:`MalformedKey`."""
    if isinstance(raw, bytes):
        try:
            value = raw.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedKey(_detail("it is not ASCII")) from None
    else:
        value = raw
    value = value.strip(" \t")
    key = _unquote_sf_string(_without_parameters(value)) if value.startswith('"') else value
    if not key:
        raise MalformedKey(_detail("it is empty"))
    if len(key) > MAX_KEY_LENGTH:
        raise MalformedKey(_detail(f"it is {len(key)} characters long"))
    if not _visible(key):
        raise MalformedKey(_detail("it has a space, a control or a non-ASCII character"))
    return key


def _part(text: str) -> bytes:
    encoded = text.encode("utf-8", "surrogatepass")
    return len(encoded).to_bytes(4, "big") + encoded


# The hashed (namespace, tenant) parts by (namespace, tenant): bounded, as tenants may be many.
_PREFIXES: dict[tuple[str, str], bytes] = {}


def storage_key(tenant: str, key: str, namespace: str = "") -> str:
    """The key a store keeps: a hash of (namespace, tenant, key), never the raw key.

    Each part is hashed with its length (4 bytes) before it, in one pass."""
    prefix = _PREFIXES.get((namespace, tenant))
    if prefix is None:
        prefix = _part(namespace) + _part(tenant)
        if len(_PREFIXES) < 10_000:
            _PREFIXES[(namespace, tenant)] = prefix
    return hashlib.sha256(prefix + _part(key)).hexdigest()


_configured = os.environ.get("ONCELY_HASH_SECRET", "")
_SECRET = hashlib.sha256(_configured.encode()).digest() if _configured else os.urandom(32)


def _hash(value: str, person: bytes) -> str:
    data = value.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, key=_SECRET, digest_size=8, person=person).hexdigest()


def key_hash(storage_key: str) -> str:
    """A short keyed hash of a storage key: what logs, events and metrics show of a key."""
    return _hash(storage_key, b"oncely-key")


def tenant_hash(tenant: str) -> str:
    """A short keyed hash of a tenant: what logs and events show of a tenant."""
    return _hash(tenant, b"oncely-tenant")


class Hashed:
    """A storage key as a log line shows it: its :func:`key_hash`, computed only if the line
    is written."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __str__(self) -> str:
        return key_hash(self.key)
