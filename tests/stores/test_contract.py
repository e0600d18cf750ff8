"""The store contract: every backend must pass every test here, against the real server.

Times are moved with ``backend.advance``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from oncely import Claimed, Existing, State, StoredResponse
from oncely._flow import Policy, refusal_for
from oncely._flow import Refuse as RefuseOutcome
from oncely._flow import Replay as ReplayOutcome
from oncely.events import AsyncInspectable, StoreStats
from oncely.stores._stats import key_hash

from .conftest import Backend

FP = "v1:" + "a" * 64
OTHER_FP = "v1:" + "b" * 64
BINARY = bytes(range(256)) * 4 + b"\0\xff tail"


def new_key() -> str:
    return uuid.uuid4().hex


def response(body: bytes = b'{"id":"pay_1"}', status: int = 201) -> StoredResponse:
    return StoredResponse(
        status=status,
        headers=(("content-type", "application/json"), ("location", "/payments/pay_1")),
        body=body,
    )


async def claim(backend: Backend, key: str, fp: str = FP, lease: float = 60) -> Claimed:
    result = await backend.store.claim(key, fp, lease=lease)
    assert isinstance(result, Claimed), result
    return result


async def existing(backend: Backend, key: str, fp: str = FP, lease: float = 60) -> Existing:
    result = await backend.store.claim(key, fp, lease=lease)
    assert isinstance(result, Existing), result
    return result


async def test_first_claim_wins_and_a_second_sees_it_in_flight(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key)
    assert won.attempt == 1
    assert won.fingerprint == FP
    seen = await existing(backend, key)
    assert seen.record.state is State.IN_FLIGHT
    assert seen.record.token == won.token
    assert seen.record.fingerprint == FP


async def test_a_claim_with_another_fingerprint_sees_the_original(backend: Backend) -> None:
    key = new_key()
    await claim(backend, key)
    seen = await existing(backend, key, OTHER_FP)
    assert seen.record.fingerprint == FP


async def test_completed_response_comes_back_byte_for_byte(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key)
    stored = response(BINARY, status=200)
    assert await backend.store.complete(won, stored, ttl=100, tombstone_ttl=1000)
    seen = await existing(backend, key)
    assert seen.record.state is State.COMPLETED
    assert seen.record.response == stored
    assert isinstance(refusal_for(seen, FP, Policy()), ReplayOutcome)


async def test_a_large_body_round_trips(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key)
    body = bytes(i % 251 for i in range(1024 * 1024))
    assert await backend.store.complete(won, response(body), ttl=100, tombstone_ttl=1000)
    seen = await existing(backend, key)
    assert seen.record.response is not None
    assert seen.record.response.body == body


async def test_a_not_replayable_outcome_is_kept_as_such(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key)
    kept = StoredResponse(201, (("location", "/payments/pay_9"),), b"", replayable=False)
    assert await backend.store.complete(won, kept, ttl=100, tombstone_ttl=1000)
    seen = await existing(backend, key)
    assert seen.record.response == kept
    outcome = refusal_for(seen, FP, Policy())
    assert isinstance(outcome, RefuseOutcome)
    assert outcome.error.status == 410  # gone for good: 409 is for in flight only
    assert outcome.error.extensions["location"] == "/payments/pay_9"


async def test_concurrent_claims_have_exactly_one_winner(backend: Backend) -> None:
    key = new_key()
    results = await asyncio.gather(*(backend.store.claim(key, FP, lease=60) for _ in range(50)))
    winners = [r for r in results if isinstance(r, Claimed)]
    assert len(winners) == 1
    assert all(r.record.token == winners[0].token for r in results if isinstance(r, Existing))


async def test_an_expired_lease_is_taken_over_by_the_same_request(backend: Backend) -> None:
    key = new_key()
    first = await claim(backend, key, lease=10)
    backend.advance(5)
    await existing(backend, key)  # still leased
    backend.advance(6)
    second = await claim(backend, key, lease=10)
    assert second.token != first.token
    assert second.attempt == 2


async def test_an_expired_lease_is_not_taken_over_by_another_request(backend: Backend) -> None:
    key = new_key()
    await claim(backend, key, lease=10)
    backend.advance(11)
    seen = await existing(backend, key, OTHER_FP)
    assert seen.record.fingerprint == FP


async def test_a_zombie_cannot_complete_release_or_renew_after_takeover(backend: Backend) -> None:
    key = new_key()
    zombie = await claim(backend, key, lease=10)
    backend.advance(11)
    owner = await claim(backend, key, lease=10)
    assert not await backend.store.complete(zombie, response(b"zombie"), ttl=100, tombstone_ttl=10)
    assert not await backend.store.release(zombie)
    assert not await backend.store.renew(zombie, lease=10)
    record = await backend.store.get(key)
    assert record is not None
    assert record.token == owner.token
    assert record.state is State.IN_FLIGHT
    assert await backend.store.complete(owner, response(b"owner"), ttl=100, tombstone_ttl=10)
    assert not await backend.store.complete(zombie, response(b"zombie"), ttl=100, tombstone_ttl=10)
    seen = await existing(backend, key)
    assert seen.record.response is not None
    assert seen.record.response.body == b"owner"


async def test_a_zombie_cannot_touch_a_key_released_and_claimed_again(backend: Backend) -> None:
    key = new_key()
    zombie = await claim(backend, key, lease=10)
    backend.advance(11)
    middle = await claim(backend, key, lease=10)
    assert await backend.store.release(middle)
    owner = await claim(backend, key, lease=10)
    assert not await backend.store.complete(zombie, response(b"zombie"), ttl=100, tombstone_ttl=10)
    record = await backend.store.get(key)
    assert record is not None
    assert record.token == owner.token


async def test_renewal_keeps_the_lease(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key, lease=10)
    backend.advance(8)
    assert await backend.store.renew(won, lease=10)
    backend.advance(8)
    seen = await existing(backend, key)
    assert seen.record.token == won.token
    backend.advance(3)
    taken = await claim(backend, key, lease=10)
    assert taken.token != won.token


async def test_release_frees_the_key_for_a_fresh_claim(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key)
    assert await backend.store.release(won)
    assert await backend.store.get(key) is None
    again = await claim(backend, key, OTHER_FP)
    assert again.attempt == 1
    assert not await backend.store.release(won)


async def test_complete_again_by_its_owner_changes_nothing_and_says_stored(
    backend: Backend,
) -> None:
    key = new_key()
    won = await claim(backend, key)
    assert await backend.store.complete(won, response(b"one"), ttl=100, tombstone_ttl=10)
    first = await backend.store.get(key)
    backend.advance(5)
    assert await backend.store.complete(won, response(b"two"), ttl=100, tombstone_ttl=10)
    assert await backend.store.get(key) == first
    assert not await backend.store.release(won)
    seen = await existing(backend, key)
    assert seen.record.response is not None
    assert seen.record.response.body == b"one"


async def test_after_the_ttl_a_tombstone_refuses_and_then_the_key_is_free(
    backend: Backend,
) -> None:
    key = new_key()
    won = await claim(backend, key)
    assert await backend.store.complete(won, response(), ttl=100, tombstone_ttl=1000)
    backend.advance(101)
    seen = await existing(backend, key)
    same = refusal_for(seen, FP, Policy())
    assert isinstance(same, RefuseOutcome)
    assert same.error.status == 410
    assert same.error.extensions["reason"] == "expired"
    other = refusal_for(await existing(backend, key, OTHER_FP), OTHER_FP, Policy())
    assert isinstance(other, RefuseOutcome)
    assert other.error.status == 422
    backend.advance(1000)
    fresh = await claim(backend, key, OTHER_FP)
    assert fresh.attempt == 1


async def test_purge_deletes_forgotten_records_and_strips_expired_bodies(
    backend: Backend,
) -> None:
    gone, tomb, live = new_key(), new_key(), new_key()
    won = await claim(backend, gone)
    assert await backend.store.complete(won, response(), ttl=10, tombstone_ttl=10)
    won = await claim(backend, tomb)
    assert await backend.store.complete(won, response(), ttl=10, tombstone_ttl=1000)
    won = await claim(backend, live)
    assert await backend.store.complete(won, response(), ttl=1000, tombstone_ttl=1000)
    backend.advance(25)
    deleted = await backend.store.purge()
    assert deleted >= 1
    assert await backend.store.get(gone) is None
    tombstone = await backend.store.get(tomb)
    assert tombstone is not None
    assert tombstone.fingerprint == FP
    assert tombstone.response is None
    kept = await backend.store.get(live)
    assert kept is not None
    assert kept.response == response()


async def test_purge_respects_its_limit(backend: Backend) -> None:
    keys = [new_key() for _ in range(5)]
    for key in keys:
        won = await claim(backend, key)
        assert await backend.store.complete(won, response(), ttl=1, tombstone_ttl=1)
    backend.advance(10)
    assert await backend.store.purge(limit=2) == 2
    remaining = [k for k in keys if await backend.store.get(k) is not None]
    assert len(remaining) == 3


async def test_get_of_an_unknown_key_is_none(backend: Backend) -> None:
    assert await backend.store.get(new_key()) is None


async def test_recovery_points_survive_release_and_pass_to_the_next_attempt(
    backend: Backend,
) -> None:
    key = new_key()
    first = await claim(backend, key)
    assert await backend.store.record_phase(first, "created", '{"id":"pay_1"}')
    assert await backend.store.record_phase(first, "charged", '{"ok":true}')
    assert await backend.store.release(first)
    kept = await backend.store.get(key)
    assert kept is not None
    assert kept.state is State.IN_FLIGHT
    assert kept.phases == (("created", '{"id":"pay_1"}'), ("charged", '{"ok":true}'))
    resumed = await claim(backend, key)
    assert resumed.attempt == 2
    assert resumed.phases == kept.phases


async def test_recovery_points_pass_to_a_takeover_and_a_zombie_cannot_add_any(
    backend: Backend,
) -> None:
    key = new_key()
    zombie = await claim(backend, key, lease=10)
    assert await backend.store.record_phase(zombie, "created", '{"id":1}')
    backend.advance(11)
    owner = await claim(backend, key, lease=10)
    assert owner.phases == (("created", '{"id":1}'),)
    assert not await backend.store.record_phase(zombie, "charged", "{}")
    record = await backend.store.get(key)
    assert record is not None
    assert record.phases == (("created", '{"id":1}'),)


async def test_a_forgotten_record_starts_over_without_recovery_points(backend: Backend) -> None:
    key = new_key()
    first = await claim(backend, key)
    assert await backend.store.record_phase(first, "created", "{}")
    assert await backend.store.complete(first, response(), ttl=10, tombstone_ttl=10)
    assert not await backend.store.record_phase(first, "late", "{}")
    backend.advance(25)
    fresh = await claim(backend, key, OTHER_FP)
    assert fresh.attempt == 1
    assert fresh.phases == ()


async def test_renewal_extends_the_retention_of_an_abandoned_record(backend: Backend) -> None:
    key = new_key()
    won = await claim(backend, key, lease=10)
    before = await backend.store.get(key)
    assert before is not None
    backend.advance(5)
    assert await backend.store.renew(won, lease=10)
    after = await backend.store.get(key)
    assert after is not None
    assert after.forget_at > before.forget_at
    assert after.forget_at - after.lease_until == pytest.approx(
        before.forget_at - before.lease_until
    )


def stats_of(backend: Backend) -> AsyncInspectable:
    assert isinstance(backend.store, AsyncInspectable), f"{backend.name} has no stats()"
    return backend.store


async def test_stats_count_records_by_state_and_list_the_oldest_leases(backend: Backend) -> None:
    empty = await stats_of(backend).stats()
    assert empty == StoreStats(0, 0, 0, 0, None, ())
    short, long, done, soon_tomb, soon_gone = (new_key() for _ in range(5))
    await claim(backend, long, lease=300)
    await claim(backend, short, lease=60)
    for key, ttl, kept in ((done, 1000, 1000), (soon_tomb, 50, 1000), (soon_gone, 50, 10)):
        won = await claim(backend, key)
        assert await backend.store.complete(won, response(), ttl=ttl, tombstone_ttl=kept)
    backend.advance(100)
    seen = await stats_of(backend).stats()
    # short's lease ended 40 s ago: still in flight (a retry takes it over), listed first.
    assert (seen.in_flight, seen.completed, seen.tombstones, seen.expired) == (2, 1, 1, 1)
    assert seen.oldest_lease_left == pytest.approx(-40, abs=5)
    assert [k.key_hash for k in seen.in_flight_keys] == [key_hash(short), key_hash(long)]
    assert [k.lease_left for k in seen.in_flight_keys] == [
        pytest.approx(-40, abs=5),
        pytest.approx(200, abs=5),
    ]
    assert all(k.attempt == 1 for k in seen.in_flight_keys)
    # Both were claimed 100 s ago (the lease's age), whatever their lease's length.
    assert [k.age for k in seen.in_flight_keys] == [
        pytest.approx(100, abs=5),
        pytest.approx(100, abs=5),
    ]
    limited = await stats_of(backend).stats(limit=1)
    assert [k.key_hash for k in limited.in_flight_keys] == [key_hash(short)]
    assert limited.in_flight == 2
    assert await backend.store.purge() == 1
    after = await stats_of(backend).stats(limit=0)
    assert (after.in_flight, after.completed, after.tombstones, after.expired) == (2, 1, 1, 0)
    assert after.in_flight_keys == ()
    # A takeover is a new owner: its lease's age starts again, its attempt counts on.
    backend.advance(30)
    await claim(backend, short, lease=60)
    taken = await stats_of(backend).stats()
    assert [(k.key_hash, k.attempt) for k in taken.in_flight_keys] == [
        (key_hash(short), 2),
        (key_hash(long), 1),
    ]
    assert [k.age for k in taken.in_flight_keys] == [
        pytest.approx(0, abs=5),
        pytest.approx(130, abs=5),
    ]
