"""The sans-IO core, driven by hand: every operation it yields, every outcome it returns.

Nothing here does I/O or sleeps: each test plays the store and the app by sending results (or
throwing errors) into the generator.
"""

from __future__ import annotations

import json

import pytest

from oncely import (
    Claimed,
    Existing,
    KeyInFlight,
    KeyReused,
    Record,
    ResponseNotReplayable,
    State,
    StoredResponse,
    StoreUnavailable,
)
from oncely._flow import (
    DEFAULT_HEADER_ALLOWLIST,
    AppFailed,
    Claim,
    Clock,
    Complete,
    Detach,
    Failed,
    Flow,
    Fresh,
    Op,
    Outcome,
    PassThrough,
    Policy,
    Ran,
    Refuse,
    Release,
    Replay,
    Run,
    Sleep,
    flow,
    is_kept,
)

KEY = "f" * 64
FP = "v1:" + "a" * 64
OTHER_FP = "v1:" + "b" * 64
NOW = 1_800_000_000.0
CLAIM = Claimed(key=KEY, fingerprint=FP, token="tok-1", attempt=1, lease_until=NOW + 60)
HEADERS = (("content-type", "application/json"), ("location", "/payments/pay_1"))
STORED = StoredResponse(status=201, headers=HEADERS, body=b'{"id":"pay_1"}')


# Helpers: play the driver -----------------------------------------------------------------

# The driver's monotonic clock, as the tests set it: every Clock operation reads it.
T0 = 1000.0
clock = [T0]


@pytest.fixture(autouse=True)
def _reset_clock() -> None:
    clock[0] = T0


def _past_clock(f: Flow, op: Op) -> Op:
    while isinstance(op, Clock):
        op = f.send(clock[0])
    return op


def start(policy: Policy | None = None) -> tuple[Flow, Op]:
    f = flow(KEY, FP, policy or Policy())
    return f, _past_clock(f, next(f))


def step(f: Flow, value: object) -> Op:
    """Send ``value`` and return the next operation (clock reads answered); fails if the flow
    ends instead."""
    return _past_clock(f, f.send(value))


def end(f: Flow, value: object) -> Outcome:
    """Send ``value`` and return the outcome; fails if the flow yields another operation."""
    try:
        op = step(f, value)
    except StopIteration as stop:
        outcome: Outcome = stop.value
        return outcome
    pytest.fail(f"the flow went on with {op!r}")


def step_throw(f: Flow, error: BaseException) -> Op:
    return _past_clock(f, f.throw(error))


def end_throw(f: Flow, error: BaseException) -> Outcome:
    try:
        op = step_throw(f, error)
    except StopIteration as stop:
        outcome: Outcome = stop.value
        return outcome
    pytest.fail(f"the flow went on with {op!r}")


def is_run(op: Op, claim: Claimed | None) -> bool:
    """``op`` runs the app with ``claim`` (and, with a claim, its lease from the claim's send)."""
    assert isinstance(op, Run), op
    if claim is None:
        return op.claim is None and op.lease is None
    assert op.lease is not None
    return op.claim == claim and op.lease.until == T0 + op.lease.duration


def record(
    *,
    fingerprint: str = FP,
    state: State = State.COMPLETED,
    response: StoredResponse | None = STORED,
    expires_at: float = NOW + 3600,
) -> Record:
    return Record(
        key=KEY,
        fingerprint=fingerprint,
        state=state,
        token="tok-0",
        attempt=1,
        lease_until=NOW + 30 if state is State.IN_FLIGHT else NOW - 10,
        expires_at=expires_at,
        forget_at=expires_at + 7 * 24 * 3600,
        response=response if state is State.COMPLETED else None,
    )


def in_flight(fingerprint: str = FP) -> Existing:
    return Existing(record(fingerprint=fingerprint, state=State.IN_FLIGHT), NOW)


def completed(
    *, response: StoredResponse | None = STORED, expires_at: float = NOW + 3600
) -> Existing:
    return Existing(record(response=response, expires_at=expires_at), NOW)


def ran(
    status: int = 201, headers: tuple[tuple[str, str], ...] = HEADERS, body: bytes = b"x"
) -> Ran:
    return Ran(status=status, headers=headers, body=body)


def claimed_and_ran(policy: Policy | None = None) -> Flow:
    """A flow that won its claim and is waiting for the app's result."""
    f, op = start(policy)
    assert isinstance(op, Claim)
    assert is_run(step(f, CLAIM), CLAIM)
    return f


def refused(outcome: Outcome) -> dict[str, object]:
    assert isinstance(outcome, Refuse), outcome
    return outcome.error.to_dict()


# Claim -----------------------------------------------------------------------------------


def test_the_first_operation_is_one_claim_with_the_lease() -> None:
    """Every flow starts by claiming the key with its fingerprint and lease, nothing else."""
    _, op = start(Policy(lease=42.0))
    assert op == Claim(KEY, FP, 42.0)


def test_a_won_claim_runs_the_app_with_that_claim() -> None:
    """Claimed leads to Run carrying the claim and its lease, counted from when the claim was
    sent (so the driver can renew it)."""
    f, _ = start()
    assert is_run(step(f, CLAIM), CLAIM)


# Kept outcomes: claim -> run -> complete ---------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 302, 303, 400, 404, 409, 422])
def test_2xx_3xx_and_4xx_answers_are_completed(status: int) -> None:
    """The app's answer is stored once with the route's TTLs, and the outcome says stored."""
    policy = Policy(ttl=100.0, tombstone_ttl=1000.0)
    f = claimed_and_ran(policy)
    op = step(f, ran(status, body=b"answer"))
    assert op == Complete(
        CLAIM, StoredResponse(status=status, headers=HEADERS, body=b"answer"), 100.0, 1000.0
    )
    assert end(f, True) == Fresh(stored=True)


@pytest.mark.parametrize("replay_errors", [False, True])
@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_release_the_key_even_with_replay_errors(
    status: int, replay_errors: bool
) -> None:
    """A redirect that asks for the same request elsewhere is not the outcome: the redirected
    request, under the same key, must be free to run."""
    f = claimed_and_ran(Policy(replay_errors=replay_errors))
    assert step(f, ran(status)) == Release(CLAIM)
    assert end(f, True) == Fresh(stored=False)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_5xx_408_and_429_release_the_key(status: int) -> None:
    """Transient answers are not kept: the key is released so a retry runs again."""
    f = claimed_and_ran()
    assert step(f, ran(status)) == Release(CLAIM)
    assert end(f, True) == Fresh(stored=False)


def test_an_exception_releases_the_key_and_is_reported() -> None:
    """An app that raised before answering frees the key; the error goes back to the driver."""
    error = RuntimeError("boom")
    f = claimed_and_ran()
    assert step(f, AppFailed(error, started=False)) == Release(CLAIM)
    assert end(f, True) == Failed(error)


def test_an_exception_mid_stream_releases_the_key() -> None:
    """An app that raised after starting but before finishing its answer frees the key."""
    error = RuntimeError("boom")
    f = claimed_and_ran()
    assert step(f, AppFailed(error, started=True)) == Release(CLAIM)
    assert end(f, True) == Failed(error)


def test_an_exception_after_a_whole_success_keeps_that_success() -> None:
    """A 2xx the client already has (then a failing background task) is completed, not released."""
    error = RuntimeError("background task failed")
    f = claimed_and_ran()
    op = step(f, AppFailed(error, started=True, response=ran(201, body=b"done")))
    expected = StoredResponse(status=201, headers=HEADERS, body=b"done")
    assert isinstance(op, Complete)
    assert op.response == expected
    assert end(f, True) == Failed(error, expected)


def test_an_exception_after_a_whole_error_page_releases_the_key() -> None:
    """A framework's 500 page followed by the re-raised error is released by default."""
    error = RuntimeError("boom")
    f = claimed_and_ran()
    page = ran(500, headers=(("content-type", "text/plain"),), body=b"Internal Server Error")
    assert step(f, AppFailed(error, started=True, response=page)) == Release(CLAIM)
    assert end(f, True) == Failed(error)


# replay_errors=True: at most once ----------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_replay_errors_keeps_transient_answers(status: int) -> None:
    """With replay_errors, 5xx, 408 and 429 are completed and replayed like any answer."""
    f = claimed_and_ran(Policy(replay_errors=True))
    op = step(f, ran(status, body=b"err"))
    assert isinstance(op, Complete)
    assert op.response == StoredResponse(status=status, headers=HEADERS, body=b"err")
    assert end(f, True) == Fresh(stored=True)


def test_replay_errors_stores_a_500_problem_for_an_exception_before_the_response() -> None:
    """An exception with nothing sent yet is kept as a generic 500 problem, sent and replayed."""
    error = RuntimeError("secret detail")
    f = claimed_and_ran(Policy(replay_errors=True))
    op = step(f, AppFailed(error, started=False))
    assert isinstance(op, Complete)
    kept = op.response
    assert kept.status == 500
    assert dict(kept.headers)["content-type"] == "application/problem+json"
    problem = json.loads(kept.body)
    assert problem["status"] == 500
    assert {"type", "title", "detail"} <= problem.keys()
    assert b"secret" not in kept.body
    assert end(f, True) == Failed(error, kept)


def test_replay_errors_keeps_the_error_page_the_client_already_got() -> None:
    """With replay_errors, a whole 500 page sent before the exception is what is kept."""
    error = RuntimeError("boom")
    page = ran(500, headers=(("content-type", "text/plain"),), body=b"Internal Server Error")
    f = claimed_and_ran(Policy(replay_errors=True))
    op = step(f, AppFailed(error, started=True, response=page))
    assert isinstance(op, Complete)
    assert op.response == StoredResponse(
        status=500, headers=(("content-type", "text/plain"),), body=b"Internal Server Error"
    )
    assert end(f, True) == Failed(error, op.response)


def test_replay_errors_keeps_a_half_sent_answer_as_a_500() -> None:
    """With replay_errors, an exception mid-stream keeps the key (as a 500): never a second run."""
    error = RuntimeError("boom")
    f = claimed_and_ran(Policy(replay_errors=True))
    op = step(f, AppFailed(error, started=True))
    assert isinstance(op, Complete)
    assert op.response.status == 500
    assert end(f, True) == Failed(error, op.response)


# Existing records ------------------------------------------------------------------------


def test_a_completed_record_with_the_same_fingerprint_is_replayed() -> None:
    """Replay carries the stored response as it is; the flow does nothing else."""
    f, _ = start()
    assert end(f, completed()) == Replay(STORED)


@pytest.mark.parametrize(
    "existing",
    [
        pytest.param(Existing(record(fingerprint=OTHER_FP), NOW), id="completed"),
        pytest.param(in_flight(OTHER_FP), id="in-flight"),
        pytest.param(Existing(record(fingerprint=OTHER_FP, response=None), NOW), id="tombstone"),
    ],
)
def test_another_fingerprint_is_refused_with_422_key_reused(existing: Existing) -> None:
    """The same key with another request is 422 with its own problem type; nothing runs."""
    f, _ = start()
    outcome = end(f, existing)
    assert isinstance(outcome, Refuse)
    assert isinstance(outcome.error, KeyReused)
    problem = outcome.error.to_dict()
    assert problem["status"] == 422
    assert problem["type"] == "https://oncely.dev/problems/idempotency-key-reused"


def test_a_key_in_flight_is_409_with_retry_after() -> None:
    """Without wait, a duplicate of a running request is refused at once with Retry-After."""
    f, _ = start(Policy(retry_after=2.5))
    outcome = end(f, in_flight())
    assert isinstance(outcome, Refuse)
    assert isinstance(outcome.error, KeyInFlight)
    assert outcome.error.status == 409
    assert outcome.error.headers() == [("retry-after", "3")]


def test_retry_after_is_at_least_one_second() -> None:
    """A sub-second retry_after is rounded up to the smallest valid Retry-After."""
    f, _ = start(Policy(retry_after=0.01))
    outcome = end(f, in_flight())
    assert isinstance(outcome, Refuse)
    assert outcome.error.headers() == [("retry-after", "1")]


def test_an_expired_response_is_410_expired() -> None:
    """Past the replay window (record still kept), the repeat is told it completed and expired."""
    f, _ = start()
    outcome = end(f, completed(expires_at=NOW))
    problem = refused(outcome)
    assert isinstance(outcome, Refuse)
    assert isinstance(outcome.error, ResponseNotReplayable)
    assert problem["status"] == 410
    assert problem["reason"] == "expired"
    assert outcome.error.headers() == []  # permanent: nothing to retry after


def test_a_tombstone_is_410_expired() -> None:
    """A completed record whose response was dropped (a tombstone) never runs again."""
    f, _ = start()
    problem = refused(end(f, completed(response=None, expires_at=NOW - 1)))
    assert problem["type"] == "https://oncely.dev/problems/response-not-replayable"
    assert problem["reason"] == "expired"


def test_a_response_too_large_to_keep_is_410_with_status_and_location() -> None:
    """A completed but unreplayable record says so, with the original status and Location."""
    kept = StoredResponse(status=201, headers=HEADERS, body=b"", replayable=False)
    f, _ = start()
    problem = refused(end(f, completed(response=kept)))
    assert problem["status"] == 410
    assert problem["reason"] == "too_large"
    assert problem["original_status"] == 201
    assert problem["location"] == "/payments/pay_1"


def test_an_unreplayable_response_without_location_omits_it() -> None:
    """No Location header was sent, so none is invented."""
    kept = StoredResponse(status=200, headers=(), body=b"", replayable=False)
    f, _ = start()
    problem = refused(end(f, completed(response=kept)))
    assert problem["original_status"] == 200
    assert "location" not in problem


# wait: poll the claim while the first request runs -----------------------------------------


def test_wait_sleeps_and_claims_again_then_replays_what_completed_meanwhile() -> None:
    """With wait, an in-flight key is polled; once it completes the duplicate gets the replay."""
    f, _ = start(Policy(wait=1.0, poll_interval=0.25))
    assert step(f, in_flight()) == Sleep(0.25)
    assert step(f, None) == Claim(KEY, FP, 60.0)
    assert step(f, in_flight()) == Sleep(0.25)
    assert step(f, None) == Claim(KEY, FP, 60.0)
    assert end(f, completed()) == Replay(STORED)


def test_wait_runs_the_app_if_the_first_request_released_the_key_meanwhile() -> None:
    """A first request that failed and released its key lets the waiting duplicate run."""
    f, _ = start(Policy(wait=1.0, poll_interval=0.25))
    assert step(f, in_flight()) == Sleep(0.25)
    assert step(f, None) == Claim(KEY, FP, 60.0)
    assert is_run(step(f, CLAIM), CLAIM)


def test_wait_gives_up_with_409_when_its_polls_run_out() -> None:
    """wait / poll_interval polls, then the usual 409: the wait is bounded."""
    f, _ = start(Policy(wait=0.3, poll_interval=0.1))
    for _ in range(3):
        assert step(f, in_flight()) == Sleep(0.1)
        assert step(f, None) == Claim(KEY, FP, 60.0)
    outcome = end(f, in_flight())
    assert isinstance(outcome, Refuse)
    assert isinstance(outcome.error, KeyInFlight)


def test_wait_still_refuses_another_payload_at_once() -> None:
    """Waiting is only for the same request: another fingerprint is 422 without sleeping."""
    f, _ = start(Policy(wait=5.0))
    assert refused(end(f, in_flight(OTHER_FP)))["status"] == 422


# Store trouble --------------------------------------------------------------------------


def test_store_down_on_claim_fails_closed_with_503() -> None:
    """No claim, no run: the client gets 503 with Retry-After, and the app never runs."""
    f, _ = start(Policy(retry_after=4.0))
    outcome = end_throw(f, StoreUnavailable("down"))
    assert isinstance(outcome, Refuse)
    assert isinstance(outcome.error, StoreUnavailable)
    assert outcome.error.status == 503
    assert outcome.error.headers() == [("retry-after", "4")]
    assert "down" not in outcome.error.detail


def test_store_down_on_claim_with_fail_open_runs_the_app_unprotected() -> None:
    """fail_open runs the app without a claim, and the outcome says it passed through."""
    down = StoreUnavailable("down")
    f, _ = start(Policy(fail_open=True))
    assert is_run(step_throw(f, down), None)
    assert end(f, ran(201)) == PassThrough(down)


def test_fail_open_reports_an_app_exception() -> None:
    """Unprotected, a raising app is still reported as failed (and nothing is released)."""
    error = RuntimeError("boom")
    f, _ = start(Policy(fail_open=True))
    assert is_run(step_throw(f, StoreUnavailable("down")), None)
    assert end(f, AppFailed(error, started=False)) == Failed(error)


def test_a_write_after_the_app_that_fails_is_tried_again_after_a_pause() -> None:
    """A store blip after the app ran is waited out while the lease holds: pause, write again."""
    down = StoreUnavailable("down")
    f = claimed_and_ran(Policy(lease=10.0))
    op = step(f, ran(201))
    assert isinstance(op, Complete)
    assert step_throw(f, down) == Sleep(0.05)
    assert step(f, None) == op
    assert step_throw(f, down) == Sleep(0.1)  # doubling
    assert step(f, None) == op
    assert end(f, True) == Fresh(stored=True)


def test_pauses_between_tries_double_up_to_one_second() -> None:
    """Backoff: 50 ms doubling, capped at 1 s."""
    f = claimed_and_ran(Policy(lease=1000.0, store_timeout=1000.0))
    op = step(f, ran(201))
    pauses = []
    for _ in range(8):
        pause = step_throw(f, StoreUnavailable("down"))
        assert isinstance(pause, Sleep)
        pauses.append(pause.seconds)
        assert step(f, None) == op
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_past_store_timeout_the_client_is_answered_while_the_write_goes_on() -> None:
    """Detach hands the driver the answer for the client; the flow keeps trying the write."""
    down = StoreUnavailable("down")
    f = claimed_and_ran(Policy(lease=30.0, store_timeout=2.0))
    op = step(f, ran(201))
    clock[0] = T0 + 1.96
    # Never paused past the time the client is answered.
    pause = step_throw(f, down)
    assert isinstance(pause, Sleep)
    assert pause.seconds == pytest.approx(0.04)
    clock[0] = T0 + 2.0
    assert step(f, None) == op
    assert step_throw(f, down) == Detach(Fresh(stored=False, deferred=True), KEY)
    assert isinstance(step(f, True), Sleep)
    assert step(f, None) == op
    assert end(f, True) == Fresh(stored=True)


def test_a_write_still_failing_as_the_lease_ends_is_abandoned() -> None:
    """The limit: once the lease is about to end the write is given up and reported."""
    down = StoreUnavailable("down")
    f = claimed_and_ran(Policy(lease=10.0, store_timeout=100.0))
    assert isinstance(step(f, ran(201)), Complete)
    clock[0] = T0 + 10.0
    assert end_throw(f, down) == Fresh(stored=False, store_error=down)


def test_a_renewed_lease_keeps_the_write_going_past_the_first_lease() -> None:
    """The lease is the flow's, handed to the driver on Run: renewals move its end on."""
    down = StoreUnavailable("down")
    f, _ = start(Policy(lease=10.0, store_timeout=100.0))
    run = step(f, CLAIM)
    assert isinstance(run, Run)
    assert run.lease is not None
    op = step(f, ran(201))
    run.lease.renewed(T0 + 8.0)  # what the driver's renewal does
    clock[0] = T0 + 12.0
    assert isinstance(step_throw(f, down), Sleep)
    assert step(f, None) == op


def test_a_lost_lease_ends_the_tries_at_once() -> None:
    """A renewal that found another owner: the write is fenced anyway, so it stops."""
    f, _ = start(Policy(lease=10.0))
    run = step(f, CLAIM)
    assert isinstance(run, Run)
    assert run.lease is not None
    assert isinstance(step(f, ran(201)), Complete)
    run.lease.lost = True
    assert end_throw(f, StoreUnavailable("down")) == Fresh(
        stored=False, lost_lease=True, superseded=True
    )


def test_store_down_on_release_until_the_lease_ends_still_answers() -> None:
    """A release that never lands leaves the key to its lease; the answer still goes out."""
    down = StoreUnavailable("down")
    f = claimed_and_ran()
    assert step(f, ran(503)) == Release(CLAIM)
    clock[0] = T0 + 60.0
    assert end_throw(f, down) == Fresh(stored=False, store_error=down)


def test_store_down_after_an_exception_reports_both() -> None:
    """The app's error and the store's are both returned to the driver."""
    error, down = RuntimeError("boom"), StoreUnavailable("down")
    f = claimed_and_ran()
    assert step(f, AppFailed(error, started=False)) == Release(CLAIM)
    clock[0] = T0 + 60.0
    assert end_throw(f, down) == Failed(error, store_error=down)


def test_an_exception_is_answered_past_store_timeout_while_its_release_goes_on() -> None:
    """The release after an error detaches too, with the error for the driver to raise."""
    error, down = RuntimeError("boom"), StoreUnavailable("down")
    f = claimed_and_ran(Policy(store_timeout=1.0))
    assert step(f, AppFailed(error, started=False)) == Release(CLAIM)
    clock[0] = T0 + 1.0
    assert step_throw(f, down) == Detach(Failed(error), KEY)


# Fencing: a lost lease ----------------------------------------------------------------------


def test_a_complete_refused_by_the_store_is_a_lost_lease() -> None:
    """Complete returning False: another claim owns the key and its answer is the one kept."""
    f = claimed_and_ran()
    assert isinstance(step(f, ran(201)), Complete)
    assert end(f, False) == Fresh(stored=False, lost_lease=True, superseded=True)


def test_a_release_refused_by_the_store_is_a_lost_lease() -> None:
    """Release returning False means another claim owns the key now."""
    f = claimed_and_ran()
    assert step(f, ran(500)) == Release(CLAIM)
    assert end(f, False) == Fresh(stored=False, lost_lease=True)


# What is stored --------------------------------------------------------------------------


def test_only_allow_listed_headers_are_stored() -> None:
    """Set-Cookie, Date and anything not allow-listed never reach the store."""
    headers = (
        ("content-type", "application/json"),
        ("location", "/p/1"),
        ("content-location", "/p/1"),
        ("etag", '"abc"'),
        ("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("link", "</p>; rel=up"),
        ("set-cookie", "session=secret"),
        ("date", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("x-request-id", "r1"),
        ("content-length", "1"),
        ("authorization", "Bearer secret"),
    )
    f = claimed_and_ran()
    op = step(f, ran(201, headers=headers))
    assert isinstance(op, Complete)
    assert op.response.headers == headers[:6]


def test_the_default_allow_list_never_contains_set_cookie_or_date() -> None:
    """The defaults keep the answer's own headers and never a cookie or a date."""
    assert {"set-cookie", "date", "authorization"}.isdisjoint(DEFAULT_HEADER_ALLOWLIST)
    assert {
        "content-type",
        "location",
        "content-location",
        "etag",
        "last-modified",
        "link",
    } <= DEFAULT_HEADER_ALLOWLIST


def test_a_custom_allow_list_replaces_the_default() -> None:
    """header_allowlist decides which headers are kept."""
    f = flow(KEY, FP, Policy(), header_allowlist=frozenset({"x-kept"}))
    assert step(f, None) == Claim(KEY, FP, 60.0)
    assert is_run(step(f, CLAIM), CLAIM)
    op = step(f, ran(201, headers=(("x-kept", "1"), ("content-type", "text/plain"))))
    assert isinstance(op, Complete)
    assert op.response.headers == (("x-kept", "1"),)


def test_an_answer_too_large_to_keep_completes_as_not_replayable() -> None:
    """A body over the limit completes the key without its body, marked not replayable."""
    f = claimed_and_ran()
    op = step(f, Ran(status=201, headers=HEADERS, body=b"", too_large=True))
    assert isinstance(op, Complete)
    assert op.response == StoredResponse(status=201, headers=HEADERS, body=b"", replayable=False)
    assert end(f, True) == Fresh(stored=True)


def test_a_too_large_transient_answer_is_released_not_completed() -> None:
    """Size does not change the rule: a large 503 still frees the key."""
    f = claimed_and_ran()
    assert step(f, Ran(status=503, headers=(), body=b"", too_large=True)) == Release(CLAIM)


@pytest.mark.parametrize(
    ("status", "kept"),
    [
        *[(200, True), (201, True), (301, True), (302, True), (303, True), (400, True)],
        *[(422, True), (499, True), (307, False), (308, False)],
        *[(408, False), (429, False), (500, False), (503, False), (599, False)],
    ],
)
def test_is_kept_follows_the_table(status: int, kept: bool) -> None:
    """2xx, 3xx, 4xx are kept except 307, 308, 408 and 429; 5xx are not; replay_errors keeps
    all but the redirects that ask for the same request elsewhere."""
    assert is_kept(status, replay_errors=False) is kept
    assert is_kept(status, replay_errors=True) is (status not in (307, 308))


def test_a_response_the_app_committed_itself_costs_no_further_store_write() -> None:
    """attempt.complete() in the business transaction already stored it: no Complete op."""
    f = claimed_and_ran()
    committed = Ran(status=201, headers=HEADERS, body=b"x", completed=True)
    assert end(f, committed) == Fresh(stored=True)
