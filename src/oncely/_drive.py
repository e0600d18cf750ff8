"""The async driver: performs the flow's store operations, with timeouts and lease renewal.

Writes after the app ran (``complete``, ``release``) are the ones a store blip must not lose:
the app's effect has happened, and a lost write leaves the key in flight until its lease ends,
when a retry would take it over and run the request a second time. The key is ours for the
whole lease, so there is time to record the outcome:

    claim ─ lease ──────────────────────────────────────────────────────────────────► lease ends
      │ app runs │ write ✗ │ retry ✗ │ retry ✗ …  (renewal keeps trying too) │ write ✓
                 │◄── store_timeout ──►│ the client gets its answer here at the latest;
                                         the write goes on in the background (bounded in
                                         number, awaited on shutdown) until it lands, or
                                         until the lease is lost or about to end

A renewal that gets through extends the time left. Only when the lease is lost (another claim
owns the key) or about to end is the outcome abandoned, and logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from ._codec import Claimed
from ._errors import StoreUnavailable
from ._flow import AppFailed, Claim, Complete, Deferred, Flow, Outcome, Ran, Release, Run, Sleep
from .stores import AsyncStore

__all__ = ["BackgroundWrites", "Lease", "adrive", "write_while_owned"]

log = logging.getLogger("oncely")

RunApp = Callable[[Claimed | None, "Lease | None"], Awaitable[Ran | AppFailed]]

# Pauses between tries of a write after the app ran: doubling from the first, at most the last.
WRITE_RETRY_FIRST = 0.05
WRITE_RETRY_CAP = 1.0
# Seconds of lease below which a write is given up: it could not land in time to matter.
LEASE_END_MARGIN = 0.02
# Writes that may go on after their client was answered, per middleware; past this many, a
# request waits for its own write (so a long outage cannot pile up tasks without bound).
BACKGROUND_WRITES_LIMIT = 1000


async def _call_store(awaitable: Awaitable[object], limit: float | None) -> object:
    """Await a store operation within ``limit`` seconds (None: the store bounds itself).

    Any failure is :class:`StoreUnavailable`: the built-in stores raise nothing else, and a
    store of the user's that lets a driver error through must not turn a blip into a lost
    outcome either.
    """
    try:
        if limit is None:
            return await awaitable
        async with asyncio.timeout(limit):
            return await awaitable
    except StoreUnavailable:
        raise
    except TimeoutError as exc:
        raise StoreUnavailable(f"the store did not answer within {limit:g} s") from exc
    except Exception as exc:
        raise StoreUnavailable(f"the store failed: {type(exc).__name__}: {exc}") from exc


class Lease:
    """What this process knows of its claim's lease, on its own monotonic clock.

    The store's lease began when the store ran the claim, after it was sent: so the key is
    surely ours until ``sent + lease`` here, whatever the two clocks read. A renewal that gets
    through moves that on; one that finds another owner marks the lease ``lost``.
    """

    __slots__ = ("duration", "lost", "until")

    def __init__(self, duration: float, sent: float) -> None:
        self.duration = duration
        self.until = sent + duration
        self.lost = False

    def renewed(self, sent: float) -> None:
        self.until = max(self.until, sent + self.duration)

    def left(self) -> float:
        return self.until - time.monotonic()


async def write_while_owned(
    write: Callable[[], Awaitable[object]],
    lease: Lease,
    limit: float | None,
    *,
    key: str,
    what: str,
    error: StoreUnavailable | None = None,
) -> object:
    """Try ``write`` until it succeeds, with backoff, while the lease holds.

    ``error``: the failure of a first try already made. Returns the write's result, or False
    once the lease is lost (the write is fenced: it would change nothing). Raises the last
    :class:`StoreUnavailable` when the lease is about to end.
    """
    delay = WRITE_RETRY_FIRST
    tries, started = 0, time.monotonic()
    # Renewals that get through extend the lease, but a store that answers renewals and keeps
    # refusing this write (a value it will never take) must not hold the key for ever: retries
    # last one lease at most from the first failure.
    give_up_at = started + lease.duration
    while True:
        if error is not None:
            if lease.lost:
                log.error("oncely: abandoned the %s of key %s: its lease was lost", what, key)
                return False
            left = min(lease.left(), give_up_at - time.monotonic())
            if left <= LEASE_END_MARGIN:
                log.error(
                    "oncely: abandoned the %s of key %s after %d tries in %.1f s: the lease "
                    "ends (or a lease's worth of retries is spent) and the store still fails "
                    "(%s); a retry after the lease will run the request again",
                    what,
                    key,
                    tries,
                    time.monotonic() - started,
                    error,
                )
                raise error
            pause = min(delay, left / 2)  # a renewal may extend the lease meanwhile
            log.warning(
                "oncely: the %s of key %s failed, retrying in %.2g s (%.1f s of lease left): %s",
                what,
                key,
                pause,
                left,
                error,
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, WRITE_RETRY_CAP)
        tries += 1
        try:
            result = await _call_store(write(), limit)
        except StoreUnavailable as exc:
            error = exc
            continue
        if tries > 1:
            log.warning(
                "oncely: wrote the %s of key %s after %d tries in %.1f s",
                what,
                key,
                tries,
                time.monotonic() - started,
            )
        return result


class BackgroundWrites:
    """Writes that outlived their request's answer: bounded in number, awaited on shutdown."""

    def __init__(self, limit: int = BACKGROUND_WRITES_LIMIT) -> None:
        self.limit = limit
        self._tasks: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def adopt(self, task: asyncio.Task[object], key: str) -> bool:
        """Let ``task`` go on after its client is answered; False when too many already do."""
        if len(self._tasks) >= self.limit:
            log.warning(
                "oncely: %d outcome writes already in the background; key %s waits for its own",
                len(self._tasks),
                key,
            )
            return False
        self._tasks.add(task)
        task.add_done_callback(self._done)
        log.warning(
            "oncely: answered the client of key %s while its outcome is still being written "
            "(%d writes in the background)",
            key,
            len(self._tasks),
        )
        return True

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # logged where it happened; mark it as seen

    async def drain(self) -> None:
        """Wait for every write in the background (each ends when it lands or its lease does)."""
        if self._tasks:
            log.warning("oncely: waiting for %d outcome writes before shutdown", len(self._tasks))
        while self._tasks:
            await asyncio.wait(set(self._tasks))


class _Renewal:
    """Renews a claim's lease every third of it while the app runs and its outcome is written.

    Nothing is scheduled but a timer: a request that ends within a third of its lease costs no
    store round trip for renewal. A renewal that fails is tried again soon (backoff, up to the
    interval), so the lease is renewed as soon as the store answers again.
    """

    def __init__(self, store: AsyncStore, claim: Claimed, lease: Lease, timeout: float) -> None:
        self._store, self._claim, self._lease, self._timeout = store, claim, lease, timeout
        self._interval = max(lease.duration / 3, 0.05)
        loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = loop.call_later(self._interval, self._start)
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._handle = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        backoff = WRITE_RETRY_FIRST
        while True:
            sent = time.monotonic()
            try:
                owned = await _call_store(
                    self._store.renew(self._claim, lease=self._lease.duration), self._timeout
                )
            except StoreUnavailable as exc:
                pause = min(backoff, self._interval, WRITE_RETRY_CAP)
                log.warning("oncely: lease renewal failed, retrying in %g s: %s", pause, exc)
                await asyncio.sleep(pause)
                backoff *= 2
                continue
            if not owned:
                self._lease.lost = True
                log.warning("oncely: lease lost to another claim of key %s", self._claim.key)
                return
            self._lease.renewed(sent)
            backoff = WRITE_RETRY_FIRST
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def adrive(
    flow: Flow,
    store: AsyncStore,
    run_app: RunApp,
    *,
    lease: float,
    store_timeout: float,
    writes: BackgroundWrites | None = None,
) -> Outcome:
    """Run ``flow`` to its outcome, doing its operations against ``store`` and ``run_app``.

    With ``writes``, a write after the app that has not landed within ``store_timeout`` of the
    app's answer goes on there, and the flow learns :class:`Deferred`.
    """
    # Stores in this process (memory, SQLite) bound their own waits (SQLite's busy_timeout);
    # a timer per operation would cost more than the operation.
    limit: float | None = None if getattr(store, "in_process", False) else store_timeout
    send = flow.send
    value: object = None
    held: Lease | None = None
    renewal: _Renewal | None = None
    answer_by = 0.0
    handed_off = False

    async def after_the_app(
        write: Callable[[], Awaitable[object]], claim: Claimed, what: str
    ) -> object:
        nonlocal handed_off
        try:
            return await _call_store(write(), limit)  # the usual case: no task, no timer
        except StoreUnavailable as exc:
            first = exc
        key = claim.key
        if held is None:  # a claim of the caller's: no lease to write under
            raise first
        task: asyncio.Task[object] = asyncio.ensure_future(
            _keep_writing(write, held, limit, renewal, key=key, what=what, error=first)
        )
        left = answer_by - time.monotonic()
        if left > 0:
            await asyncio.wait({task}, timeout=left)
        if task.done():
            return task.result()
        if writes is not None and writes.adopt(task, key):
            handed_off = True  # the task stops the renewal when it ends
            return Deferred()
        return await asyncio.shield(task)  # a cancelled request leaves its write going on

    try:
        while True:
            try:
                op = send(value)
            except StopIteration as done:
                outcome: Outcome = done.value
                return outcome
            send = flow.send
            try:
                if isinstance(op, Claim):
                    sent = time.monotonic()
                    value = await _call_store(
                        store.claim(op.key, op.fingerprint, lease=op.lease), limit
                    )
                    if isinstance(value, Claimed):
                        held = Lease(op.lease, sent)
                elif isinstance(op, Run):
                    if op.claim is not None and held is not None:
                        renewal = _Renewal(store, op.claim, held, store_timeout)
                    value = await run_app(op.claim, held if op.claim is not None else None)
                    answer_by = time.monotonic() + store_timeout
                elif isinstance(op, Complete):
                    value = await after_the_app(
                        functools.partial(
                            store.complete,
                            op.claim,
                            op.response,
                            ttl=op.ttl,
                            tombstone_ttl=op.tombstone_ttl,
                        ),
                        op.claim,
                        "completion",
                    )
                elif isinstance(op, Release):
                    value = await after_the_app(
                        functools.partial(store.release, op.claim), op.claim, "release"
                    )
                else:
                    assert isinstance(op, Sleep)
                    await asyncio.sleep(op.seconds)
                    value = None
            except StoreUnavailable as exc:
                if isinstance(op, Claim):
                    log.warning("oncely: could not claim key %s: %s", op.key, exc)
                send, value = flow.throw, exc  # type: ignore[assignment]
    finally:
        if renewal is not None and not handed_off:
            await renewal.stop()


async def _keep_writing(
    write: Callable[[], Awaitable[object]],
    lease: Lease,
    limit: float | None,
    renewal: _Renewal | None,
    *,
    key: str,
    what: str,
    error: StoreUnavailable,
) -> object:
    try:
        return await write_while_owned(write, lease, limit, key=key, what=what, error=error)
    finally:
        if renewal is not None:
            await renewal.stop()
