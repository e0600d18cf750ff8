"""Every store rule, written once in Python.

Each rule is a pure function of the record under a key (or None), the caller's arguments and
the store's clock ``now``. It answers what the caller gets and what becomes of the record:
``KEEP`` (leave it as it is), ``DELETE``, or the new :class:`Record` to write. The memory store
runs these functions as they are; the SQL statements and Lua scripts of the other stores express
the same rules in their own language, and a Hypothesis state machine
(``tests/stores/test_state_machine.py``) holds every store, both sides, to these functions.

    rule             the caller wins / gets True when ...        and the record becomes
    claim            no record, or past forget_at (fresh)          in flight, attempt 1, no phases
                     in flight, lease expired, same fingerprint    in flight, attempt + 1, phases
                     (takeover)                                    kept, a new token
                     otherwise: Existing(record, now)              unchanged
    complete         owned (token and in flight)                   completed, response kept for
                                                                   ttl, fingerprint tombstone_ttl
                     completed under the same token: True again    unchanged
    release          owned, no recovery points                     deleted
                     owned, with recovery points                   lease ends now, phases kept
    record_phase     owned                                         phase appended
    renew            owned                                         lease now + lease; retention
                                                                   extended, never shortened
    purge            past forget_at                                deleted
                     completed, past expires_at, body kept         body stripped (a tombstone)
"""

from __future__ import annotations

import dataclasses
import enum
import time
from os import urandom as _urandom  # secrets.token_bytes, without its call
from typing import Final, Literal

from .._codec import Claimed, Existing, Record, State, StoredResponse

__all__ = [
    "ABANDONED_RETENTION",
    "DELETE",
    "KEEP",
    "Change",
    "claim_rule",
    "claimable",
    "claimed_at",
    "complete_rule",
    "new_token",
    "owned",
    "phase_rule",
    "purge_rule",
    "release_rule",
    "renew_rule",
    "strip",
]

# Seconds an abandoned in-flight record (its lease long expired, never completed) is kept, so that
# a retry of the same request can still take it over and another request under its key is refused.
ABANDONED_RETENTION = 7 * 24 * 3600.0


class _Verb(enum.Enum):
    KEEP = "keep"
    DELETE = "delete"


KEEP: Final = _Verb.KEEP
DELETE: Final = _Verb.DELETE

#: What a rule does to the record: leave it, delete it, or write this one.
Change = Record | Literal[_Verb.KEEP, _Verb.DELETE]


def new_token(now: float | None = None) -> str:
    """A fencing token: 80 random bits, so no two claims of a key ever share one, even after a
    purge, after the claim's time (milliseconds, hex, on the claiming process's clock), so that
    ``oncely inspect`` can say how long the current owner has held the key. Stores compare tokens
    for equality only; tokens of older versions (32 hex digits) have no time and stay valid."""
    at = int((time.time() if now is None else now) * 1000)
    return f"{at:012x}.{_urandom(10).hex()}"  # what secrets.token_hex(10) gives


def claimed_at(token: str) -> float | None:
    """When the claim that made ``token`` was taken (seconds, the claiming process's clock), or
    None for a token that carries no time."""
    stamp, dot, rest = token.partition(".")
    if not dot or len(stamp) != 12 or len(rest) != 20:
        return None
    try:
        return int(stamp, 16) / 1000
    except ValueError:
        return None


def claimable(old: Record, fingerprint: str, now: float) -> bool:
    """Whether a claim with ``fingerprint`` wins over the record that is there."""
    if old.forget_at <= now:
        return True  # forgotten: the key is free
    return (
        old.state is State.IN_FLIGHT and old.lease_until <= now and old.fingerprint == fingerprint
    )


def owned(record: Record | None, claim: Claimed) -> bool:
    """Whether ``claim`` still owns the key (the fence of every write after a claim)."""
    return record is not None and record.token == claim.token and record.state is State.IN_FLIGHT


def claim_rule(
    old: Record | None,
    key: str,
    fingerprint: str,
    *,
    lease: float,
    now: float,
    token: str | None = None,
) -> tuple[Claimed | Existing, Change]:
    """A claim of ``key``; ``token`` is the one proposed (a new one when not given)."""
    if old is not None and not claimable(old, fingerprint, now):
        return Existing(old, now), KEEP
    if old is not None and old.forget_at > now:
        attempt, phases = old.attempt + 1, old.phases  # a takeover
    else:
        attempt, phases = 1, ()
    lease_until = now + lease
    token = token or new_token(now)  # the claim's time on the store's clock, as its lease
    # Positional (the fields in their order): a claim is the hottest rule.
    record = Record(
        key,
        fingerprint,
        State.IN_FLIGHT,
        token,
        attempt,
        lease_until,
        lease_until,  # expires_at
        lease_until + ABANDONED_RETENTION,  # forget_at
        None,  # response
        phases,
    )
    return Claimed(key, fingerprint, token, attempt, lease_until, phases), record


def complete_rule(
    old: Record | None,
    claim: Claimed,
    response: StoredResponse,
    *,
    ttl: float,
    tombstone_ttl: float,
    now: float,
) -> tuple[bool, Change]:
    if old is not None and old.token == claim.token and old.state is State.COMPLETED:
        return True, KEEP  # idempotent for its own token: a retry learns it is stored
    if old is None or not owned(old, claim):
        return False, KEEP
    # dataclasses.replace(old, state=..., expires_at=..., forget_at=..., response=...), without
    # its walk over the fields
    return True, Record(
        old.key,
        old.fingerprint,
        State.COMPLETED,
        old.token,
        old.attempt,
        old.lease_until,
        now + ttl,
        now + ttl + tombstone_ttl,
        response,
        old.phases,
    )


def release_rule(old: Record | None, claim: Claimed, *, now: float) -> tuple[bool, Change]:
    if old is None or not owned(old, claim):
        return False, KEEP
    if old.phases:
        # Keep the recovery points: the next claim takes over and resumes from them.
        return True, dataclasses.replace(old, lease_until=now, expires_at=now)
    return True, DELETE


def phase_rule(old: Record | None, claim: Claimed, name: str, data: str) -> tuple[bool, Change]:
    if old is None or not owned(old, claim):
        return False, KEEP
    return True, dataclasses.replace(old, phases=(*old.phases, (name, data)))


def renew_rule(
    old: Record | None, claim: Claimed, *, lease: float, now: float
) -> tuple[bool, Change]:
    if old is None or not owned(old, claim):
        return False, KEEP
    lease_until = now + lease
    return True, dataclasses.replace(
        old,
        lease_until=lease_until,
        expires_at=lease_until,
        forget_at=max(old.forget_at, lease_until + ABANDONED_RETENTION),
    )


def purge_rule(old: Record, *, now: float) -> Literal["delete", "strip", "keep"]:
    """What purge does to one record (each of the two kinds is bounded by purge's ``limit``)."""
    if old.forget_at <= now:
        return "delete"
    if old.state is State.COMPLETED and old.expires_at <= now and old.response is not None:
        return "strip"  # past its replay window a record keeps only its fingerprint
    return "keep"


def strip(record: Record) -> Record:
    """The tombstone of a completed record: its fingerprint and times, without the body."""
    return dataclasses.replace(record, response=None)
