"""The drivers: they do what the flow yields, against a store and the app, and nothing else.

One loop, twice: :func:`adrive` for an :class:`AsyncStore` (asyncio; the lease is renewed by a
timer and a task) and :func:`drive` for a :class:`Store` (blocking; the lease is renewed by a
thread). Every decision (what to write, when to try again, when to answer the client while a
write goes on) is the flow's; a driver performs the operation, wraps any store failure as
:class:`StoreUnavailable` and sends the result back in.

:class:`Detach` is the one operation a driver answers with a choice: if its bound on writes in
the background has room, it hands the rest of the flow to a task (or a thread) and returns the
outcome the flow gave it, so the client is answered while the write goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Generic, TypeVar

from ._codec import Claimed
from ._errors import StoreUnavailable
from ._flow import (
    CLOCK,
    WRITE_RETRY_CAP,
    WRITE_RETRY_FIRST,
    AppFailed,
    Claim,
    Clock,
    Complete,
    Detach,
    Lease,
    Op,
    Ran,
    RecordPhase,
    Release,
    Run,
    Sleep,
)
from ._keys import Hashed, key_hash
from ._observe import Watch
from .stores import AsyncStore, Store

__all__ = ["BackgroundThreads", "BackgroundWrites", "adrive", "drive"]

_perf_counter = time.perf_counter

log = logging.getLogger("oncely")

T = TypeVar("T")
AsyncRunApp = Callable[[Claimed | None, Lease | None], Awaitable[Ran | AppFailed]]
SyncRunApp = Callable[[Claimed | None, Lease | None], Ran | AppFailed]

# Writes that may go on after their client was answered, per middleware; past this many, a
# request waits for its own write (so a long outage cannot pile up tasks without bound).
BACKGROUND_WRITES_LIMIT = 1000


def _store_error(exc: Exception, limit: float | None) -> StoreUnavailable:
    """Any failure of a store call as :class:`StoreUnavailable`: the built-in stores raise
    nothing else, and a user's store that lets a driver error through must not turn a blip
    into a lost outcome either."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, TimeoutError) and limit is not None:
        return StoreUnavailable(f"the store did not answer within {limit:g} s")
    return StoreUnavailable(f"the store failed: {type(exc).__name__}: {exc}")


async def _call_store(awaitable: Awaitable[object], limit: float | None) -> object:
    """Await a store operation within ``limit`` seconds (None: the store bounds itself)."""
    try:
        if limit is None:
            return await awaitable
        async with asyncio.timeout(limit):
            return await awaitable
    except Exception as exc:
        error = _store_error(exc, limit)
        if error is exc:
            raise
        raise error from exc


def _limit(store: object, store_timeout: float) -> float | None:
    # Stores in this process (memory, SQLite) bound their own waits (SQLite's busy_timeout);
    # a timer per operation would cost more than the operation.
    return None if getattr(store, "in_process", False) else store_timeout


def _logged_loss(lease: Lease, key: str) -> None:
    lease.lost = True
    log.warning("oncely: lease lost to another claim of key %s", Hashed(key))


class _Writes(Generic[T]):
    """Flows that outlived their request's answer: bounded in number."""

    def __init__(self, limit: int = BACKGROUND_WRITES_LIMIT) -> None:
        self.limit = limit
        self._running: set[T] = set()

    def __len__(self) -> int:
        return len(self._running)

    def room(self, key: str) -> bool:
        if len(self._running) >= self.limit:
            log.warning(
                "oncely: %d outcome writes already in the background; key %s waits for its own",
                len(self._running),
                Hashed(key),
            )
            return False
        return True

    def _adopted(self, key: str) -> None:
        log.warning(
            "oncely: answered the client of key %s while its outcome is still being written "
            "(%d writes in the background)",
            Hashed(key),
            len(self._running),
        )


# Async -------------------------------------------------------------------------------------


class BackgroundWrites(_Writes["asyncio.Task[object]"]):
    """Async writes that outlived their request's answer: bounded, awaited on shutdown."""

    def adopt(self, task: asyncio.Task[object], key: str) -> None:
        self._running.add(task)
        task.add_done_callback(self._done)
        self._adopted(key)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # logged where it happened; mark it as seen

    async def drain(self) -> None:
        """Wait for every write in the background (each ends when it lands or its lease does)."""
        if self._running:
            log.warning("oncely: waiting for %d outcome writes before shutdown", len(self._running))
        while self._running:
            await asyncio.wait(set(self._running))


class _Due:
    """The lease renewals waiting for their time on one event loop, behind one timer.

    Arming a renewal per request with ``call_later`` costs a timer handle (and a context copy)
    that nearly every request cancels unused. Here arming is an append: renewals of one
    interval fall due in the order they were armed, so each interval keeps a queue and the
    loop keeps one timer, for the head of each queue. A renewal cancelled before its time is
    dropped when it reaches the head, or when the cancelled ones are most of what is queued.
    """

    # No reference to the loop itself: it is the key of a weak dictionary of these.
    def __init__(self) -> None:
        self._queues: dict[float, collections.deque[tuple[float, _AsyncRenewal]]] = {}
        self._timing: set[float] = set()  # intervals whose head has a timer (not kept here)
        self._queued = 0
        self._cancelled = 0

    def arm(self, renewal: _AsyncRenewal, interval: float, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + interval
        queue = self._queues.get(interval)
        if queue is None:
            queue = self._queues[interval] = collections.deque()
        queue.append((due, renewal))
        self._queued += 1
        if interval not in self._timing:
            self._timing.add(interval)
            loop.call_at(due, self._fire, interval)

    def cancelled(self) -> None:
        """One armed renewal will not start after all."""
        self._cancelled += 1
        if self._cancelled > 1000 and 2 * self._cancelled > self._queued:
            for interval, queue in self._queues.items():
                self._queues[interval] = collections.deque(e for e in queue if e[1].armed)
            self._queued -= self._cancelled
            self._cancelled = 0

    def _fire(self, interval: float) -> None:
        self._timing.discard(interval)
        queue = self._queues[interval]
        loop = asyncio.get_running_loop()
        # A timer may fire up to the clock's resolution early.
        now = loop.time() + 0.001
        while queue and queue[0][0] <= now:
            renewal = queue.popleft()[1]
            self._queued -= 1
            if renewal.armed:
                renewal.start(loop)
            else:
                self._cancelled -= 1
        if queue:
            self._timing.add(interval)
            loop.call_at(queue[0][0], self._fire, interval)
        else:
            del self._queues[interval]


_dues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Due] = weakref.WeakKeyDictionary()
_last_due: tuple[asyncio.AbstractEventLoop, _Due] | None = None


def _due_on(loop: asyncio.AbstractEventLoop) -> _Due:
    """The renewals of ``loop`` (the last loop asked for is remembered: it is nearly always
    the same one)."""
    global _last_due
    last = _last_due
    if last is not None and last[0] is loop:
        return last[1]
    due = _dues.get(loop)
    if due is None:
        due = _dues[loop] = _Due()
    _last_due = (loop, due)
    return due


class _AsyncRenewal:
    """Renews a claim's lease every third of it while the app runs and its outcome is written.

    Nothing is scheduled but a place in the loop's queue of renewals (:class:`_Due`): a request
    that ends within a third of its lease costs no store round trip for renewal. A renewal that
    fails is tried again soon (backoff, up to the interval), so the lease is renewed as soon as
    the store answers again.
    """

    __slots__ = (
        "_claim",
        "_context",
        "_due",
        "_interval",
        "_lease",
        "_store",
        "_task",
        "_timeout",
        "armed",
    )

    def __init__(self, store: AsyncStore, claim: Claimed, lease: Lease, timeout: float) -> None:
        self._store, self._claim, self._lease, self._timeout = store, claim, lease, timeout
        self._interval = interval = max(lease.duration / 3, 0.05)
        self._task: asyncio.Task[None] | None = None
        # The renewal runs in the request's context, as a timer of its own would have.
        self._context = contextvars.copy_context()
        self.armed = True  # waiting for its time
        loop = asyncio.get_running_loop()
        self._due = _due_on(loop)
        self._due.arm(self, interval, loop)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.armed = False
        self._task = loop.create_task(self._loop(), context=self._context)

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
                _logged_loss(self._lease, self._claim.key)
                return
            self._lease.renewed(sent)
            backoff = WRITE_RETRY_FIRST
            await asyncio.sleep(self._interval)

    def cancel(self) -> bool:
        """Stop the renewal if it has not started (True); False when it is running."""
        if self._task is not None:
            return False
        if self.armed:
            self.armed = False
            self._due.cancelled()
        return True

    async def stop(self) -> None:
        if not self.cancel():
            assert self._task is not None
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class _AsyncOps:
    """Performs one operation of the flow against an async store and the app."""

    def __init__(
        self,
        store: AsyncStore,
        run_app: AsyncRunApp | None,
        store_timeout: float,
        watch: Watch | None = None,
    ) -> None:
        self.store, self.run_app, self.timeout = store, run_app, store_timeout
        self.limit = _limit(store, store_timeout)
        self.renewal: _AsyncRenewal | None = None
        self.watch = watch

    async def do(self, op: Op) -> object:
        store, kind = self.store, type(op)
        call: Awaitable[object]
        # The exact types first, in the order a request meets them; then subclasses.
        if kind is Claim:
            claim: Claim = op  # type: ignore[assignment]  # its exact type, just checked
            call = store.claim(claim.key, claim.fingerprint, lease=claim.lease)
        elif isinstance(op, Run):
            run = op
            assert self.run_app is not None
            if run.claim is not None and run.lease is not None:
                self.renewal = _AsyncRenewal(store, run.claim, run.lease, self.timeout)
            ran = await self.run_app(run.claim, run.lease)
            if self.watch is not None:
                self.watch.ran = ran
            return ran
        elif isinstance(op, Complete):
            call = store.complete(op.claim, op.response, ttl=op.ttl, tombstone_ttl=op.tombstone_ttl)
        elif isinstance(op, Clock):
            return time.monotonic()
        elif isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        elif isinstance(op, Claim):
            call = store.claim(op.key, op.fingerprint, lease=op.lease)
        elif isinstance(op, Release):
            call = store.release(op.claim)
        else:
            assert isinstance(op, RecordPhase), op
            call = store.record_phase(op.claim, op.name, op.data)
        limit, watch = self.limit, self.watch
        began = _perf_counter() if watch is not None else 0.0
        try:
            if limit is not None:
                result = await _call_store(call, limit)
            else:  # what _call_store does, without a coroutine of its own
                result = await call
        except Exception as exc:
            if watch is not None:
                watch.operation(op, began, exc)
            if isinstance(exc, StoreUnavailable):
                raise
            raise _store_error(exc, None) from exc
        if watch is not None:
            watch.operation(op, began, result)
        return result

    async def stop(self) -> None:
        renewal = self.renewal
        if renewal is not None and not renewal.cancel():
            await renewal.stop()


async def _arun(
    steps: Generator[Op, object, T],
    ops: _AsyncOps,
    writes: BackgroundWrites | None,
    value: object = None,
) -> tuple[T, bool]:
    """Drive ``steps`` to its end: (its result, whether the rest went to the background)."""
    send = steps.send
    while True:
        try:
            op = send(value)
        except StopIteration as done:
            return done.value, False
        send = steps.send
        if op is CLOCK:  # read here: no coroutine for the most frequent operation
            value = time.monotonic()
            continue
        if isinstance(op, Detach):
            if writes is None or not writes.room(op.key):
                value = False
                continue
            writes.adopt(asyncio.ensure_future(_arest(steps, ops)), op.key)
            return op.outcome, True  # type: ignore[return-value]  # T is the flow's Outcome
        try:
            value = await ops.do(op)
        except StoreUnavailable as exc:
            send, value = steps.throw, exc  # type: ignore[assignment]


async def _arest(steps: Generator[Op, object, T], ops: _AsyncOps) -> object:
    try:
        return (await _arun(steps, ops, None, True))[0]
    finally:
        await ops.stop()


async def adrive(
    steps: Generator[Op, object, T],
    store: AsyncStore,
    run_app: AsyncRunApp | None = None,
    *,
    store_timeout: float,
    writes: BackgroundWrites | None = None,
    watch: Watch | None = None,
) -> T:
    """Run ``steps`` (a flow, or a write) to its result against ``store`` and ``run_app``.

    With ``writes``, a flow that detaches goes on there and its answer is returned now. With
    ``watch`` (a flow's), its store operations are timed and its decision is emitted.
    """
    ops = _AsyncOps(store, run_app, store_timeout, watch)
    detached = False
    try:
        result, detached = await _arun(steps, ops, writes)
    finally:
        if not detached and ops.renewal is not None:
            await ops.stop()
    if watch is not None:
        decision = watch.decided(result)  # type: ignore[arg-type]  # a flow's
        if decision is not None:
            await watch.observer.aemit(decision)
    return result


# Sync --------------------------------------------------------------------------------------


class BackgroundThreads(_Writes[threading.Thread]):
    """Blocking writes that outlived their request's answer: bounded, joined by ``drain``.

    The threads are not daemons: an exiting process waits for them (each ends when its write
    lands or its lease does).
    """

    def __init__(self, limit: int = BACKGROUND_WRITES_LIMIT) -> None:
        super().__init__(limit)
        self._lock = threading.Lock()

    def room(self, key: str) -> bool:
        with self._lock:
            return super().room(key)

    def start(self, target: Callable[[], object], key: str) -> None:
        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._running.discard(thread)

        thread = threading.Thread(target=run, name=f"oncely-write-{key_hash(key)[:8]}")
        with self._lock:
            self._running.add(thread)
        self._adopted(key)
        thread.start()

    def drain(self) -> None:
        """Wait for every write in the background."""
        while True:
            with self._lock:
                threads = list(self._running)
            if not threads:
                return
            log.warning("oncely: waiting for %d outcome writes", len(threads))
            for thread in threads:
                thread.join()


class _ThreadRenewal:
    """The lease renewed from a thread every third of it (see :class:`_AsyncRenewal`)."""

    def __init__(self, store: Store, claim: Claimed, lease: Lease) -> None:
        self._store, self._claim, self._lease = store, claim, lease
        self._interval = max(lease.duration / 3, 0.05)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="oncely-renewal", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pause, backoff = self._interval, WRITE_RETRY_FIRST
        while not self._stopped.wait(pause):
            sent = time.monotonic()
            try:
                owned = self._store.renew(self._claim, lease=self._lease.duration)
            except Exception as exc:
                pause = min(backoff, self._interval, WRITE_RETRY_CAP)
                backoff *= 2
                log.warning(
                    "oncely: lease renewal failed, retrying in %g s: %s",
                    pause,
                    _store_error(exc, None),
                )
                continue
            if not owned:
                _logged_loss(self._lease, self._claim.key)
                return
            self._lease.renewed(sent)
            pause, backoff = self._interval, WRITE_RETRY_FIRST

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class _SyncOps:
    """Performs one operation of the flow against a blocking store and the app.

    A blocking call cannot be cut short from outside: the sync stores bound their own waits
    (connect and statement timeouts, socket timeouts, SQLite's busy_timeout).
    """

    def __init__(
        self, store: Store, run_app: SyncRunApp | None, watch: Watch | None = None
    ) -> None:
        self.store, self.run_app = store, run_app
        self.renewal: _ThreadRenewal | None = None
        self.watch = watch

    def do(self, op: Op) -> object:
        store = self.store
        if isinstance(op, Clock):
            return time.monotonic()
        if isinstance(op, Sleep):
            time.sleep(op.seconds)
            return None
        if isinstance(op, Run):
            assert self.run_app is not None
            if op.claim is not None and op.lease is not None:
                self.renewal = _ThreadRenewal(store, op.claim, op.lease)
            ran = self.run_app(op.claim, op.lease)
            if self.watch is not None:
                self.watch.ran = ran
            return ran
        watch = self.watch
        if watch is None:
            return self._store_op(op)
        began = _perf_counter()
        try:
            result = self._store_op(op)
        except StoreUnavailable as exc:
            watch.operation(op, began, exc)
            raise
        watch.operation(op, began, result)
        return result

    def _store_op(self, op: Op) -> object:
        store = self.store
        try:
            if isinstance(op, Claim):
                return store.claim(op.key, op.fingerprint, lease=op.lease)
            if isinstance(op, Complete):
                return store.complete(
                    op.claim, op.response, ttl=op.ttl, tombstone_ttl=op.tombstone_ttl
                )
            if isinstance(op, Release):
                return store.release(op.claim)
            assert isinstance(op, RecordPhase), op
            return store.record_phase(op.claim, op.name, op.data)
        except Exception as exc:
            error = _store_error(exc, None)
            if error is exc:
                raise
            raise error from exc

    def stop(self) -> None:
        if self.renewal is not None:
            self.renewal.stop()


def _run(
    steps: Generator[Op, object, T],
    ops: _SyncOps,
    writes: BackgroundThreads | None,
    value: object = None,
) -> tuple[T, bool]:
    """The blocking twin of :func:`_arun`."""
    send = steps.send
    while True:
        try:
            op = send(value)
        except StopIteration as done:
            return done.value, False
        send = steps.send
        if op is CLOCK:
            value = time.monotonic()
            continue
        if isinstance(op, Detach):
            if writes is None or not writes.room(op.key):
                value = False
                continue
            writes.start(lambda: _rest(steps, ops), op.key)
            return op.outcome, True  # type: ignore[return-value]  # T is the flow's Outcome
        try:
            value = ops.do(op)
        except StoreUnavailable as exc:
            send, value = steps.throw, exc  # type: ignore[assignment]


def _rest(steps: Generator[Op, object, T], ops: _SyncOps) -> object:
    try:
        return _run(steps, ops, None, True)[0]
    finally:
        ops.stop()


def drive(
    steps: Generator[Op, object, T],
    store: Store,
    run_app: SyncRunApp | None = None,
    *,
    writes: BackgroundThreads | None = None,
    watch: Watch | None = None,
) -> T:
    """The blocking twin of :func:`adrive`, for a sync :class:`Store`."""
    ops = _SyncOps(store, run_app, watch)
    detached = False
    try:
        result, detached = _run(steps, ops, writes)
    finally:
        if not detached:
            ops.stop()
    if watch is not None:
        decision = watch.decided(result)  # type: ignore[arg-type]  # a flow's
        if decision is not None:
            watch.observer.emit(decision)
    return result
