"""An exhaustive check of the real engine: every interleaving of a few requests for one key.

The requests are the real sans-IO flow (``oncely._flow.flow``); the store is the real rules
(``oncely.stores._rules``) over one record, on a store clock of its own; the explorer plays the
driver and the world. From each state it tries every event that can happen next:

- a request's pending operation answered (Clock, Claim, Run, Complete, Release, RecordPhase,
  Sleep, Detach), a store operation also failing (nothing written) or succeeding with its reply
  lost (written, the caller told it failed);
- the app's own steps while it runs (its effect, the atomic phase and completion transactions of
  docs/phases.md, each of which may also fail or lose its reply);
- a lease renewal by a running request's driver (granted, refused because the key was taken
  over, failing, or granted with the reply lost);
- a request stopping for ever (a crash, at any point), a retry of a request that ended or
  crashed (same key, same payload), a request with another payload for the same key;
- time passing (half a lease per tick) and the store's clock jumping a lease ahead or back.

The search is breadth first over the state graph, states deduplicated by value (a state is the
store's record, the clocks, what is left of each fault budget and, per request, the answers its
flow was given; a flow is rebuilt by sending those answers again, the flow being deterministic).
Breadth first means the first violation found has a shortest trace. Every transition and every
reachable state is checked against the invariants (see ``docs/verification.md``); where no
request is left running, a retry after every lease (no faults) must end the key: a replay of
the one kept response, or a fresh run that is kept, with the effect then done exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from oncely._codec import Claimed, Existing, Record, State, StoredResponse
from oncely._errors import KeyReused, StoreUnavailable
from oncely._flow import (
    AppFailed,
    Claim,
    Clock,
    Complete,
    Detach,
    Failed,
    Fresh,
    Op,
    Outcome,
    Policy,
    Ran,
    RecordPhase,
    Refuse,
    Release,
    Replay,
    Run,
    Sleep,
    flow,
)
from oncely.stores import _rules

__all__ = [
    "PLANTED",
    "Bounds",
    "Report",
    "Rules",
    "explore",
]

KEY = "k"
PAYLOAD = "fp-a"
OTHER_PAYLOAD = "fp-b"
TICK = 1.0  # one tick of time: half a lease
LEASE = 2.0
JUMP = LEASE  # a store clock jump: a whole lease ahead or back
POLICY = Policy(
    lease=LEASE,
    ttl=1000.0,
    tombstone_ttl=1000.0,
    wait=0.0,
    poll_interval=TICK,
    retry_after=TICK,
    store_timeout=TICK / 2,
)
EFFECT = "effect"  # the atomic phase's name

AppMode = Literal["plain", "atomic", "atomic-complete"]
APP_MODES: tuple[AppMode, ...] = ("plain", "atomic", "atomic-complete")


# The store's rules, injectable so a test can plant a bug -----------------------------------


class ClaimRule(Protocol):
    def __call__(
        self,
        old: Record | None,
        key: str,
        fingerprint: str,
        *,
        lease: float,
        now: float,
        token: str | None = None,
    ) -> tuple[Claimed | Existing, _rules.Change]: ...


class CompleteRule(Protocol):
    def __call__(
        self,
        old: Record | None,
        claim: Claimed,
        response: StoredResponse,
        *,
        ttl: float,
        tombstone_ttl: float,
        now: float,
    ) -> tuple[bool, _rules.Change]: ...


class ReleaseRule(Protocol):
    def __call__(
        self, old: Record | None, claim: Claimed, *, now: float
    ) -> tuple[bool, _rules.Change]: ...


class PhaseRule(Protocol):
    def __call__(
        self, old: Record | None, claim: Claimed, name: str, data: str
    ) -> tuple[bool, _rules.Change]: ...


class RenewRule(Protocol):
    def __call__(
        self, old: Record | None, claim: Claimed, *, lease: float, now: float
    ) -> tuple[bool, _rules.Change]: ...


@dataclass(frozen=True)
class Rules:
    """The store: ``stores/_rules.py`` as every backend runs it, unless a test plants a bug."""

    claim: ClaimRule = _rules.claim_rule
    complete: CompleteRule = _rules.complete_rule
    release: ReleaseRule = _rules.release_rule
    phase: PhaseRule = _rules.phase_rule
    renew: RenewRule = _rules.renew_rule


def _complete_ignoring_token(
    old: Record | None,
    claim: Claimed,
    response: StoredResponse,
    *,
    ttl: float,
    tombstone_ttl: float,
    now: float,
) -> tuple[bool, _rules.Change]:
    if old is not None and old.state is State.IN_FLIGHT:
        claim = dataclasses.replace(claim, token=old.token)  # no fence: any holder completes
    return _rules.complete_rule(old, claim, response, ttl=ttl, tombstone_ttl=tombstone_ttl, now=now)


def _release_ignoring_token(
    old: Record | None, claim: Claimed, *, now: float
) -> tuple[bool, _rules.Change]:
    if old is not None and old.state is State.IN_FLIGHT:
        claim = dataclasses.replace(claim, token=old.token)
    return _rules.release_rule(old, claim, now=now)


def _claim_ignoring_lease(
    old: Record | None,
    key: str,
    fingerprint: str,
    *,
    lease: float,
    now: float,
    token: str | None = None,
) -> tuple[Claimed | Existing, _rules.Change]:
    if old is not None and old.state is State.IN_FLIGHT and old.fingerprint == fingerprint:
        old = dataclasses.replace(old, lease_until=now)  # every lease looks expired
    return _rules.claim_rule(old, key, fingerprint, lease=lease, now=now, token=token)


#: Stores with a bug planted on purpose: the explorer must report a trace for each.
PLANTED: dict[str, Rules] = {
    "complete-ignores-token": Rules(complete=_complete_ignoring_token),
    "release-ignores-token": Rules(release=_release_ignoring_token),
    "claim-ignores-lease": Rules(claim=_claim_ignoring_lease),
}


# Bounds and state --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """How far the search goes. Every budget is for the whole run, not per request."""

    requests: int = 2  # concurrent requests with the same payload
    mismatch: bool = False  # one more request under the same key with another payload
    retries: int = 1  # retries (same payload) of a request that crashed or ended
    crashes: int = 1  # requests that stop for ever
    errors: int = 1  # store operations that fail (or succeed with the reply lost)
    jumps: int = 0  # store clock jumps (a lease ahead or back)
    renewals: int = 1  # lease renewals per request
    ticks: int = 3  # time, in half leases
    polls: int = 0  # the flow's wait for a key in flight, in polls
    app: AppMode = "atomic"


# A request's history: what its driver sent in, in order.
#   ("send", value)        the answer to the pending operation
#   ("throw", "")          StoreUnavailable thrown in
#   ("failed", reason)     the app raised (AppFailed sent in)
#   ("renewed", sent)      the driver's renewal got through (lease.renewed(sent))
#   ("lost", "")           the driver's renewal found another owner (lease.lost = True)
Step = tuple[str, object]


@dataclass(frozen=True)
class Req:
    name: str
    fingerprint: str
    history: tuple[Step, ...] = ()
    status: Literal["live", "done", "crashed"] = "live"
    # The app's progress while it runs: () not running; ("phase",) before its atomic phase;
    # ("complete", effect) before its completion transaction.
    app: tuple[str, ...] = ()
    renewals: int = 0
    answered: str = ""  # what its client was told (a short summary), once told
    retried: bool = False


@dataclass(frozen=True)
class World:
    t: float = 0.0  # the drivers' monotonic clock
    skew: float = 0.0  # store clock minus driver clock
    record: Record | None = None
    tokens: int = 0
    reqs: tuple[Req, ...] = ()
    crashes: int = 0
    errors: int = 0
    jumps: int = 0
    retries: int = 0
    # Handler effects done: (request, token, effect id); and runs of the app: (request, token).
    effects: tuple[tuple[str, str, str], ...] = ()
    runs: tuple[tuple[str, str], ...] = ()
    kept: StoredResponse | None = None  # the first response stored
    violation: str = ""  # the first invariant an event broke

    def broken(self, message: str) -> World:
        return self if self.violation else dataclasses.replace(self, violation=message)

    @property
    def now(self) -> float:
        return self.t + self.skew


class Violation(Exception):
    """An invariant broke; the message says which, ``tail`` the events of the check's retry."""

    def __init__(self, message: str, tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.tail = tail or []


# Replaying a flow --------------------------------------------------------------------------


@dataclass
class Pending:
    """A request's flow rebuilt from its history: its next operation, or its outcome."""

    op: Op | None
    outcome: Outcome | None
    lease_lost: bool
    has_lease: bool


class _App(Exception):
    """What the app raised (a store error or LeaseLost inside its transaction)."""


class Flows:
    """Rebuilds flows from their histories (cached: many states share a request's history)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[str, tuple[Step, ...]], Pending] = {}

    def pending(self, fingerprint: str, history: tuple[Step, ...]) -> Pending:
        cache_key = (fingerprint, history)
        found = self._cache.get(cache_key)
        if found is None:
            found = self._cache[cache_key] = self._replay(fingerprint, history)
        return found

    def _replay(self, fingerprint: str, history: tuple[Step, ...]) -> Pending:
        gen = flow(KEY, fingerprint, self.policy)
        op: Op = next(gen)
        lease = None
        for kind, value in history:
            if isinstance(op, Run):
                lease = op.lease
            if kind == "renewed":
                assert lease is not None
                assert isinstance(value, float)
                lease.renewed(value)
                continue
            if kind == "lost":
                assert lease is not None
                lease.lost = True
                continue
            try:
                if kind == "send":
                    op = gen.send(value)
                elif kind == "throw":
                    op = gen.throw(StoreUnavailable("the model store failed"))
                else:
                    assert kind == "failed"
                    op = gen.send(AppFailed(_App(str(value)), started=False))
            except StopIteration as stop:
                return Pending(None, stop.value, False, False)
        if isinstance(op, Run):
            lease = op.lease
        return Pending(op, None, lease is not None and lease.lost, lease is not None)


# The explorer ------------------------------------------------------------------------------

Successor = tuple[str, World]


@dataclass
class Report:
    bounds: Bounds
    states: int = 0  # distinct reachable states
    transitions: int = 0  # edges of the state graph
    interleavings: int = 0  # distinct complete executions (maximal paths)
    quiescent: int = 0  # states with no request running, where the retry check ran
    depth: int = 0  # the longest execution, in events
    seconds: float = 0.0
    violation: str | None = None
    trace: list[str] = field(default_factory=list)

    def summary(self) -> str:
        b = self.bounds
        head = (
            f"app={b.app} requests={b.requests}{'+mismatch' if b.mismatch else ''} "
            f"retries={b.retries} crashes={b.crashes} errors={b.errors} jumps={b.jumps} "
            f"renewals={b.renewals} ticks={b.ticks} polls={b.polls}: "
            f"{self.states} states, {self.transitions} transitions, "
            f"{self.interleavings} interleavings, depth {self.depth}, {self.seconds:.1f} s"
        )
        if self.violation is None:
            return head + ", no violation"
        return head + f", VIOLATION: {self.violation}"

    def format_trace(self) -> str:
        lines = [f"violation: {self.violation}", f"trace ({len(self.trace)} events):"]
        lines += [f"  {i:2d}. {event}" for i, event in enumerate(self.trace, 1)]
        return "\n".join(lines)


class Explorer:
    def __init__(self, bounds: Bounds, rules: Rules) -> None:
        self.bounds, self.rules = bounds, rules
        policy = dataclasses.replace(POLICY, wait=bounds.polls * POLICY.poll_interval)
        self.policy = policy
        self.flows = Flows(policy)

    # -- the initial state and the invariants of a state

    def initial(self) -> World:
        b = self.bounds
        reqs = [Req(chr(ord("A") + i), PAYLOAD) for i in range(b.requests)]
        if b.mismatch:
            reqs.append(Req("X", OTHER_PAYLOAD))
        return World(
            reqs=tuple(reqs),
            crashes=b.crashes,
            errors=b.errors,
            jumps=b.jumps,
            retries=b.retries,
        )

    def check_state(self, w: World) -> None:
        if w.violation:
            raise Violation(w.violation)
        if self.bounds.app != "plain" and len(w.effects) > 1:
            raise Violation(f"the handler's effect happened {len(w.effects)} times: {w.effects}")
        runners = [name for name, _ in w.runs] if self.bounds.app == "plain" else []
        runners += [name for name, _, _ in w.effects]
        fps = {self._fingerprint_of(w, name) for name in runners}
        if len(fps) > 1:
            raise Violation("requests with different payloads both ran under one key")
        if w.kept is not None:
            record = w.record
            if record is None or record.state is not State.COMPLETED or record.response != w.kept:
                raise Violation(f"the kept response was lost or changed: record {record}")

    def _fingerprint_of(self, w: World, name: str) -> str:
        return next(r.fingerprint for r in w.reqs if r.name == name)

    # -- successors

    def successors(self, w: World) -> list[Successor]:
        out: list[Successor] = []
        b = self.bounds
        live = [i for i, r in enumerate(w.reqs) if r.status == "live"]
        for i in live:
            out += self._request_events(w, i)
        if live and w.t < b.ticks * TICK:
            out.append((f"time passes: t={w.t + TICK:g}", dataclasses.replace(w, t=w.t + TICK)))
        if live and w.jumps > 0:
            for sign in (1.0, -1.0):
                moved = dataclasses.replace(w, skew=w.skew + sign * JUMP, jumps=w.jumps - 1)
                out.append((f"store clock jumps {sign * JUMP:+g} s (now {moved.now:g})", moved))
        if w.retries > 0:
            for i, r in enumerate(w.reqs):
                if r.status != "live" and not r.retried and r.fingerprint == PAYLOAD:
                    name = r.name + "'"
                    reqs = list(w.reqs)
                    reqs[i] = dataclasses.replace(r, retried=True)
                    reqs.append(Req(name, r.fingerprint))
                    out.append(
                        (
                            f"{name}: the client of {r.name} retries (same key, same payload)",
                            dataclasses.replace(w, reqs=tuple(reqs), retries=w.retries - 1),
                        )
                    )
        return out

    def _request_events(self, w: World, i: int) -> Iterator[Successor]:
        r = w.reqs[i]
        p = self.flows.pending(r.fingerprint, r.history)
        op = p.op
        assert op is not None
        name = r.name
        if w.crashes > 0:
            yield (
                f"{name} crashes (stops for ever)",
                self._set(dataclasses.replace(w, crashes=w.crashes - 1), i, status="crashed"),
            )
        if p.has_lease and not p.lease_lost and r.renewals < self.bounds.renewals:
            yield from self._renewals(w, i, op)
        if isinstance(op, Clock):
            yield f"{name}: Clock -> {w.t:g}", self._send(w, i, ("send", w.t))
        elif isinstance(op, Sleep):
            yield f"{name}: Sleep({op.seconds:g})", self._send(w, i, ("send", None))
        elif isinstance(op, Detach):
            told = _told(op.outcome)
            w2 = self._client(w, i, op.outcome, r, detached=True)
            yield f"{name}: Detach -> client told {told}", self._send(w2, i, ("send", True))
        elif isinstance(op, Run):
            yield from self._app_events(w, i, op)
        else:
            assert isinstance(op, Claim | Complete | Release | RecordPhase), op
            yield from self._store_events(w, i, op)

    def _set(self, w: World, i: int, **changes: object) -> World:
        reqs = list(w.reqs)
        reqs[i] = dataclasses.replace(reqs[i], **changes)  # type: ignore[arg-type]
        return dataclasses.replace(w, reqs=tuple(reqs))

    def _send(self, w: World, i: int, step: Step) -> World:
        r = w.reqs[i]
        history = (*r.history, step)
        w = self._set(w, i, history=history)
        p = self.flows.pending(r.fingerprint, history)
        if p.outcome is not None:
            w = self._client(w, i, p.outcome, w.reqs[i], detached=False)
            w = self._set(w, i, status="done")
        elif isinstance(p.op, Run):
            w = self._check_run(w, i, p.op)
        return w

    # -- the client's answer

    def _client(self, w: World, i: int, outcome: Outcome, r: Req, *, detached: bool) -> World:
        if r.answered:
            return w  # told already (Detach); the flow's own outcome is only logged
        if isinstance(outcome, Replay) and (w.kept is None or outcome.response != w.kept):
            w = w.broken(
                f"{r.name} replayed {outcome.response.body!r}, not the kept response "
                f"{w.kept.body if w.kept else None!r}"
            )
        if isinstance(outcome, Fresh) and outcome.stored:
            body = self._ran_body(r)
            if w.kept is None or w.kept.body != body:
                w = w.broken(f"{r.name} was told its answer {body!r} is kept, but it is not")
        return self._set(w, i, answered=_told(outcome))

    def _ran_body(self, r: Req) -> bytes | None:
        for kind, value in r.history:
            if kind == "send" and isinstance(value, Ran):
                return value.body
        return None

    # -- the store

    def _apply(
        self, w: World, who: str, token: str | None, old: Record | None, change: _rules.Change
    ) -> World:
        """The record after a write; the fence and the kept response are checked here."""
        if change is _rules.KEEP:
            return w
        new = None if change is _rules.DELETE else change
        if token is not None and not _rules.owned(old, _claim_of(token)):
            w = w.broken(
                f"{who}, a stale holder (token {token}), changed a record it does not own: "
                f"{_show(old)} -> {_show(new)}"
            )
        if old is not None and old.state is State.COMPLETED and new != old:
            w = w.broken(f"{who} changed a completed record: {_show(old)} -> {_show(new)}")
        kept = w.kept
        if new is not None and new.state is State.COMPLETED and kept is None:
            kept = new.response
            w = self._check_kept(w, who, new)
        return dataclasses.replace(w, record=new, kept=kept)

    def _check_kept(self, w: World, who: str, new: Record) -> World:
        assert new.response is not None
        if self.bounds.app == "plain":
            bodies = {_run_body(token) for _, token in w.runs if token == new.token}
        else:
            bodies = {eid.encode() for _, _, eid in w.effects}
        if new.response.body not in bodies:
            return w.broken(
                f"{who} stored {new.response.body!r}, not the response of the execution kept"
            )
        return w

    def _claim(self, w: World, who: str, fingerprint: str) -> tuple[World, Claimed | Existing]:
        old, now = w.record, w.now
        token = f"t{w.tokens + 1}"
        result, change = self.rules.claim(old, KEY, fingerprint, lease=LEASE, now=now, token=token)
        w = dataclasses.replace(w, tokens=w.tokens + 1)
        if isinstance(result, Claimed) and old is not None and old.forget_at > now:
            if old.state is not State.IN_FLIGHT:
                w = w.broken(f"{who} claimed over a completed record {_show(old)}")
            elif old.fingerprint != fingerprint:
                w = w.broken(f"{who} with another payload took over {_show(old)}")
            elif old.lease_until > now:
                w = w.broken(
                    f"{who} took over a lease that had not expired (until {old.lease_until:g}, "
                    f"store now {now:g})"
                )
        return self._apply(w, who, None, old, change), result

    def _write(
        self, w: World, who: str, op: Complete | Release | RecordPhase
    ) -> tuple[World, bool]:
        old, now, rules = w.record, w.now, self.rules
        if isinstance(op, Complete):
            done, change = rules.complete(
                old, op.claim, op.response, ttl=op.ttl, tombstone_ttl=op.tombstone_ttl, now=now
            )
        elif isinstance(op, Release):
            done, change = rules.release(old, op.claim, now=now)
        else:
            done, change = rules.phase(old, op.claim, op.name, op.data)
        return self._apply(w, who, op.claim.token, old, change), done

    def _store_events(
        self, w: World, i: int, op: Claim | Complete | Release | RecordPhase
    ) -> Iterator[Successor]:
        r = w.reqs[i]
        what = _op_name(op)
        if isinstance(op, Claim):
            after, result = self._claim(w, r.name, op.fingerprint)
            told = _result(result)
            yield f"{r.name}: {what} -> {told}", self._send(after, i, ("send", result))
        else:
            after, done = self._write(w, r.name, op)
            yield f"{r.name}: {what} -> {done}", self._send(after, i, ("send", done))
        if w.errors > 0:
            failed = dataclasses.replace(w, errors=w.errors - 1)
            yield (
                f"{r.name}: {what} -> store error (nothing written)",
                self._send(failed, i, ("throw", "")),
            )
            lost = dataclasses.replace(after, errors=w.errors - 1)
            yield (
                f"{r.name}: {what} -> written, but the reply is lost (store error)",
                self._send(lost, i, ("throw", "")),
            )

    def _renewals(self, w: World, i: int, op: Op) -> Iterator[Successor]:
        r = w.reqs[i]
        claim = self._lease_claim(r)
        old = w.record
        owned, change = self.rules.renew(old, claim, lease=LEASE, now=w.now)
        after = self._set(
            self._apply(w, r.name, claim.token, old, change), i, renewals=r.renewals + 1
        )
        if owned:
            yield (
                f"{r.name}: renew lease -> True (store lease until {w.now + LEASE:g})",
                self._renew(after, i, ("renewed", w.t)),
            )
        else:
            yield (
                f"{r.name}: renew lease -> False (taken over)",
                self._renew(after, i, ("lost", "")),
            )
        if w.errors > 0:
            failed = self._set(
                dataclasses.replace(w, errors=w.errors - 1), i, renewals=r.renewals + 1
            )
            yield f"{r.name}: renew lease -> store error (nothing written)", failed
            if owned:
                lost = dataclasses.replace(after, errors=w.errors - 1)
                yield f"{r.name}: renew lease -> written, but the reply is lost", lost

    def _renew(self, w: World, i: int, step: Step) -> World:
        r = w.reqs[i]
        return self._set(w, i, history=(*r.history, step))

    def _lease_claim(self, r: Req) -> Claimed:
        claim = None
        for kind, value in r.history:
            if kind == "send" and isinstance(value, Claimed):
                claim = value
        assert claim is not None
        return claim

    # -- the app

    def _check_run(self, w: World, i: int, op: Run) -> World:
        r = w.reqs[i]
        if op.claim is None:
            return w.broken(f"{r.name} runs the app without a claim")
        if op.claim.fingerprint != r.fingerprint or op.claim != self._lease_claim(r):
            return w.broken(f"{r.name} runs the app under a claim that is not its own")
        return w

    def _app_events(self, w: World, i: int, op: Run) -> Iterator[Successor]:
        r = w.reqs[i]
        claim = op.claim
        assert claim is not None
        mode = self.bounds.app
        if mode == "plain":
            runs = (*w.runs, (r.name, claim.token))
            ran = Ran(201, (), _run_body(claim.token))
            yield (
                f"{r.name}: the app runs (its effect happens) -> 201 {ran.body!r}",
                self._send(dataclasses.replace(w, runs=runs), i, ("send", ran)),
            )
            return
        if not r.app:
            phases = dict(claim.phases)
            w = dataclasses.replace(w, runs=(*w.runs, (r.name, claim.token)))
            if EFFECT in phases:
                eid = phases[EFFECT]
                yield from self._after_phase(
                    w, i, claim, eid, f"{r.name}: the app runs, finds phase {EFFECT}={eid} done"
                )
                return
            yield from self._phase_tx(w, i, claim)
            return
        assert r.app[0] == "complete"
        yield from self._complete_tx(w, i, claim, r.app[1])

    def _phase_tx(self, w: World, i: int, claim: Claimed) -> Iterator[Successor]:
        """The app's transaction: its effect and the phase's recovery point, atomically."""
        r = w.reqs[i]
        eid = f"e{len(w.effects) + 1}"
        what = f"{r.name}: the app's transaction (effect {eid} + record phase {EFFECT})"
        old = w.record
        owned, change = self.rules.phase(old, claim, EFFECT, eid)
        if owned:
            committed = self._apply(w, r.name, claim.token, old, change)
            committed = dataclasses.replace(
                committed, effects=(*w.effects, (r.name, claim.token, eid))
            )
            yield from self._after_phase(committed, i, claim, eid, what + " commits")
        else:
            yield what + " -> LeaseLost, rolled back", self._fail(w, i, "LeaseLost")
        if w.errors > 0:
            failed = dataclasses.replace(w, errors=w.errors - 1)
            yield what + " -> store error, rolled back", self._fail(failed, i, "store error")
            if owned:
                lost = dataclasses.replace(committed, errors=w.errors - 1)
                yield what + " commits, but the reply is lost", self._fail(lost, i, "lost reply")

    def _after_phase(
        self, w: World, i: int, claim: Claimed, eid: str, what: str
    ) -> Iterator[Successor]:
        if self.bounds.app == "atomic":
            ran = Ran(201, (), eid.encode())
            yield (
                f"{what} -> 201 {ran.body!r}",
                self._send(self._set(w, i, app=()), i, ("send", ran)),
            )
        else:
            yield what, self._set(w, i, app=("complete", eid))

    def _complete_tx(self, w: World, i: int, claim: Claimed, eid: str) -> Iterator[Successor]:
        """The app's second transaction: the response stored with the effect's outcome."""
        r = w.reqs[i]
        what = f"{r.name}: the app's transaction (complete with {eid!r})"
        response = StoredResponse(201, (), eid.encode())
        old = w.record
        owned, change = self.rules.complete(
            old, claim, response, ttl=POLICY.ttl, tombstone_ttl=POLICY.tombstone_ttl, now=w.now
        )
        done = self._set(self._apply(w, r.name, claim.token, old, change), i, app=())
        if owned:
            ran = Ran(201, (), eid.encode(), completed=True)
            yield what + " commits -> 201", self._send(done, i, ("send", ran))
        else:
            yield what + " -> LeaseLost, rolled back", self._fail(w, i, "LeaseLost")
        if w.errors > 0:
            failed = dataclasses.replace(w, errors=w.errors - 1)
            yield what + " -> store error, rolled back", self._fail(failed, i, "store error")
            if owned:
                lost = dataclasses.replace(done, errors=w.errors - 1)
                yield what + " commits, but the reply is lost", self._fail(lost, i, "lost reply")

    def _fail(self, w: World, i: int, reason: str) -> World:
        return self._send(self._set(w, i, app=()), i, ("failed", reason))

    # -- where nothing runs: a retry after every lease must end the key

    def check_quiescent(self, w: World) -> None:
        record = w.record
        payload = record.fingerprint if record is not None else PAYLOAD
        t = w.t
        if record is not None and record.state is State.IN_FLIGHT:
            t = max(t, record.lease_until - w.skew)  # after its lease, on the store's clock
        retry = Req("R", payload)
        probe = dataclasses.replace(
            w, t=t, reqs=(*w.reqs, retry), crashes=0, errors=0, jumps=0, retries=0
        )
        i = len(probe.reqs) - 1
        tail = [f"(check) every request has ended; at t={t:g} a retry R of {payload} arrives"]
        for _ in range(100):
            if probe.reqs[i].status != "live" or probe.violation:
                break
            events = [s for s in self._request_events(probe, i) if " renew " not in s[0]]
            label, probe = events[0]
            tail.append(label)
        else:
            raise Violation("a retry after the lease never ended", tail)
        if probe.violation:
            raise Violation(probe.violation, tail)
        told = probe.reqs[i].answered
        if not (told.startswith("replay") or told == "fresh, kept"):
            raise Violation(
                f"a retry after every lease was told {told!r}: the key is stuck "
                f"(record {_show(w.record)})",
                tail,
            )
        if self.bounds.app != "plain" and len(probe.effects) != 1:
            raise Violation(
                f"after a retry ran to the end, the effect happened {len(probe.effects)} times",
                tail,
            )


# Formatting --------------------------------------------------------------------------------


def _claim_of(token: str) -> Claimed:
    return Claimed(key=KEY, fingerprint="", token=token, attempt=0, lease_until=0.0)


def _run_body(token: str) -> bytes:
    return f"run-{token}".encode()


def _op_name(op: Op) -> str:
    if isinstance(op, Claim):
        return "Claim"
    if isinstance(op, Complete):
        return f"Complete(token {op.claim.token}, {op.response.body!r})"
    if isinstance(op, Release):
        return f"Release(token {op.claim.token})"
    assert isinstance(op, RecordPhase)
    return f"RecordPhase(token {op.claim.token}, {op.name})"


def _result(result: Claimed | Existing) -> str:
    if isinstance(result, Claimed):
        return f"Claimed(token {result.token}, attempt {result.attempt}, phases {result.phases})"
    return f"Existing({_show(result.record)})"


def _show(record: Record | None) -> str:
    if record is None:
        return "no record"
    body = record.response.body if record.response is not None else None
    return (
        f"{record.state.value} token {record.token} lease until {record.lease_until:g}"
        f"{f' response {body!r}' if body is not None else ''}"
        f"{f' phases {record.phases}' if record.phases else ''}"
    )


def _told(outcome: Outcome) -> str:
    if isinstance(outcome, Replay):
        return f"replay {outcome.response.body!r}"
    if isinstance(outcome, Fresh):
        if outcome.stored:
            return "fresh, kept"
        return "fresh, not kept" + (" (superseded)" if outcome.superseded else "")
    if isinstance(outcome, Refuse):
        kind = "422" if isinstance(outcome.error, KeyReused) else str(outcome.error.status)
        return f"refused {kind}"
    if isinstance(outcome, Failed):
        return "failed"
    return type(outcome).__name__


# The search --------------------------------------------------------------------------------


def explore(
    bounds: Bounds,
    rules: Rules | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Every reachable state within ``bounds``; the shortest trace to a violation, if any."""
    explorer = Explorer(bounds, rules or Rules())
    report = Report(bounds)
    started = time.perf_counter()
    logger = logging.getLogger("oncely")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        _search(explorer, report, progress)
    finally:
        logger.disabled = was_disabled
        report.seconds = time.perf_counter() - started
    return report


def _search(
    explorer: Explorer, report: Report, progress: Callable[[int, int], None] | None
) -> None:
    root = explorer.initial()
    # Every path to a state has the same length (each event adds to the state), so the
    # breadth-first layers are a topological order: paths are counted layer by layer.
    parents: dict[int, tuple[int, int]] = {hash(root): (0, -1)}
    layer: dict[int, tuple[World, int]] = {hash(root): (root, 1)}
    depth = 0
    while layer:
        following: dict[int, tuple[World, int]] = {}
        for key, (w, paths) in layer.items():
            try:
                explorer.check_state(w)
                if all(r.status != "live" for r in w.reqs):
                    report.quiescent += 1
                    explorer.check_quiescent(w)
                successors = explorer.successors(w)
            except Violation as exc:
                _fail(explorer, report, parents, key, str(exc), exc.tail)
                report.states += len(layer)
                report.depth = depth
                return
            if not successors:
                report.interleavings += paths
            for index, (_label, child) in enumerate(successors):
                report.transitions += 1
                child_key = hash(child)
                if child_key in following:
                    seen, count = following[child_key]
                    following[child_key] = (seen, count + paths)
                    continue
                if child_key in parents:
                    continue  # reached in an earlier layer: impossible, see above
                parents[child_key] = (key, index)
                following[child_key] = (child, paths)
        report.states += len(layer)
        if progress is not None:
            progress(depth, report.states)
        if following:
            depth += 1
        layer = following
    report.depth = depth


def _fail(
    explorer: Explorer,
    report: Report,
    parents: dict[int, tuple[int, int]],
    key: int,
    message: str,
    tail: list[str],
) -> None:
    """The trace to ``key``, rebuilt by replaying the choices from the initial state."""
    choices: list[int] = []
    while True:
        parent, index = parents[key]
        if index < 0:
            break
        choices.append(index)
        key = parent
    w = explorer.initial()
    labels: list[str] = []
    for index in reversed(choices):
        label, w = explorer.successors(w)[index]
        labels.append(label)
    labels += tail
    report.violation = message
    report.trace = labels
