"""The claim rule every store implements, written once in Python.

The memory store runs it as is; the SQL and Lua stores express the same rule in their own
language, and the contract suite holds them all to it.
"""

from __future__ import annotations

import secrets

from .._codec import Claimed, Existing, Record, State

__all__ = ["ABANDONED_RETENTION", "claim_rule", "new_token"]

# Seconds an abandoned in-flight record (its lease long expired, never completed) is kept, so that
# a retry of the same request can still take it over and another request under its key is refused.
ABANDONED_RETENTION = 7 * 24 * 3600.0


def new_token() -> str:
    """A fencing token: random, so no two claims of a key ever share one, even after a purge."""
    return secrets.token_hex(16)


def claim_rule(
    old: Record | None, key: str, fingerprint: str, *, lease: float, now: float
) -> tuple[Claimed | Existing, Record | None]:
    """(what the caller gets, the record to write or None to leave the store as it is)."""
    if old is not None and old.forget_at > now:
        takeover = (
            old.state is State.IN_FLIGHT
            and old.lease_until <= now
            and old.fingerprint == fingerprint
        )
        if not takeover:
            return Existing(old, now), None
        attempt, phases = old.attempt + 1, old.phases
    else:
        attempt, phases = 1, ()
    lease_until = now + lease
    record = Record(
        key=key,
        fingerprint=fingerprint,
        state=State.IN_FLIGHT,
        token=new_token(),
        attempt=attempt,
        lease_until=lease_until,
        expires_at=lease_until,
        forget_at=lease_until + ABANDONED_RETENTION,
        phases=phases,
    )
    claimed = Claimed(
        key=key,
        fingerprint=fingerprint,
        token=record.token,
        attempt=attempt,
        lease_until=lease_until,
        phases=phases,
    )
    return claimed, record
