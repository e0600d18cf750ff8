"""Records, and the one byte format that every store shares.

A record is what a store keeps under one storage key. Its life, on the store's clock::

    claim ──────────── lease_until ─┐  (renewed while the request runs)
      │ in_flight                    │  a claim after lease_until with the same fingerprint
      │                              │  takes the key over: new token, attempt + 1
    complete ─────────────── expires_at ─────────────── forget_at
      │ completed: replayed byte for byte │ tombstone: fingerprint only │ gone: the key is free
                                          (a repeat is told the response expired;
                                           another payload is still refused)

Encoding: a compact JSON head, one NUL byte, then the body bytes exactly as produced
(no base64, no pickle). The head carries a format version, so that stores written by an
older oncely stay readable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "Claimed",
    "Existing",
    "Record",
    "State",
    "StoredResponse",
    "decode_record",
    "decode_response",
    "encode_record",
    "encode_response",
]

FORMAT_VERSION = 1


class State(StrEnum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as it is kept for replay.

    ``replayable`` is False when the operation completed but its body was too large to keep;
    then ``body`` is empty and only the status and the allow-listed headers survive.
    """

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    replayable: bool = True


@dataclass(frozen=True, slots=True)
class Record:
    """What a store holds under one storage key. Times are seconds on the store's clock."""

    key: str
    fingerprint: str
    state: State
    token: str
    attempt: int
    lease_until: float
    expires_at: float
    forget_at: float
    response: StoredResponse | None = None
    # Recovery points reached by earlier attempts: (name, JSON text), in order.
    phases: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Claimed:
    """The caller now owns the key until ``lease_until``; ``token`` fences every later write."""

    key: str
    fingerprint: str
    token: str
    attempt: int
    lease_until: float
    phases: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Existing:
    """Somebody else owns the key, or it completed; ``now`` is the store's clock at the read."""

    record: Record
    now: float


def _head_bytes(head: dict[str, object]) -> bytes:
    return json.dumps(head, separators=(",", ":"), ensure_ascii=True).encode()


def _split(data: bytes) -> tuple[dict[str, object], bytes]:
    sep = data.find(b"\0")
    if sep < 0:
        raise ValueError("not an oncely record: no head separator")
    head = json.loads(data[:sep])
    if not isinstance(head, dict):
        raise ValueError("not an oncely record: head is not an object")
    version = head.get("v")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported oncely record format version {version!r}")
    return head, data[sep + 1 :]


def _response_head(response: StoredResponse) -> dict[str, object]:
    return {
        "status": response.status,
        "headers": [list(pair) for pair in response.headers],
        "replayable": response.replayable,
    }


def _response_from(head: dict[str, object], body: bytes) -> StoredResponse:
    status = head["status"]
    headers = head["headers"]
    if not isinstance(status, int) or not isinstance(headers, list):
        raise ValueError("corrupt oncely response head")
    return StoredResponse(
        status=status,
        headers=tuple((str(name), str(value)) for name, value in headers),
        body=body,
        replayable=bool(head.get("replayable", True)),
    )


def encode_response(response: StoredResponse) -> bytes:
    """A response alone (for stores that keep the record's other fields in columns)."""
    return _head_bytes({"v": FORMAT_VERSION, **_response_head(response)}) + b"\0" + response.body


def decode_response(data: bytes) -> StoredResponse:
    head, body = _split(data)
    return _response_from(head, body)


def encode_record(record: Record) -> bytes:
    """A whole record (for key-value stores)."""
    head: dict[str, object] = {
        "v": FORMAT_VERSION,
        "fp": record.fingerprint,
        "state": record.state.value,
        "token": record.token,
        "attempt": record.attempt,
        "lease_until": record.lease_until,
        "expires_at": record.expires_at,
        "forget_at": record.forget_at,
        "phases": [list(p) for p in record.phases],
    }
    body = b""
    if record.response is not None:
        head["response"] = _response_head(record.response)
        body = record.response.body
    return _head_bytes(head) + b"\0" + body


def record_from_columns(row: Sequence[Any], phases: Iterable[Sequence[Any]]) -> Record:
    """A record from a SQL row: key, fingerprint, state, token, attempt, lease_until,
    expires_at, forget_at, response (``encode_response`` bytes or NULL); ``phases`` decoded."""
    key, fp, state, token, attempt, lease_until, expires_at, forget_at, response = row[:9]
    return Record(
        key=key,
        fingerprint=fp,
        state=State(state),
        token=token,
        attempt=attempt,
        lease_until=lease_until,
        expires_at=expires_at,
        forget_at=forget_at,
        response=None if response is None else decode_response(bytes(response)),
        phases=tuple((str(name), str(data)) for name, data in phases),
    )


def decode_record(key: str, data: bytes) -> Record:
    head, body = _split(data)
    response_head = head.get("response")
    response = _response_from(response_head, body) if isinstance(response_head, dict) else None
    phases = head.get("phases") or []
    if not isinstance(phases, list):
        raise ValueError("corrupt oncely record: phases is not a list")
    return Record(
        key=key,
        fingerprint=str(head["fp"]),
        state=State(str(head["state"])),
        token=str(head["token"]),
        attempt=int(head["attempt"]),  # type: ignore[call-overload]
        lease_until=float(head["lease_until"]),  # type: ignore[arg-type]
        expires_at=float(head["expires_at"]),  # type: ignore[arg-type]
        forget_at=float(head["forget_at"]),  # type: ignore[arg-type]
        response=response,
        phases=tuple((str(name), str(data)) for name, data in phases),
    )
