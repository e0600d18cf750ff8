"""The async driver: performs the flow's store operations, with timeouts and lease renewal."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

from ._codec import Claimed
from ._errors import StoreUnavailable
from ._flow import AppFailed, Claim, Complete, Flow, Outcome, Ran, Release, Run, Sleep
from .stores import AsyncStore

__all__ = ["adrive"]

log = logging.getLogger("oncely")

RunApp = Callable[[Claimed | None], Awaitable[Ran | AppFailed]]


async def _call_store(awaitable: Awaitable[object], limit: float | None) -> object:
    """Await a store operation within ``limit`` seconds (None: the store bounds itself)."""
    try:
        if limit is None:
            return await awaitable
        async with asyncio.timeout(limit):
            return await awaitable
    except StoreUnavailable:
        raise
    except TimeoutError as exc:
        raise StoreUnavailable(f"the store did not answer within {limit:g} s") from exc
    except (OSError, ConnectionError) as exc:
        raise StoreUnavailable(f"the store failed: {type(exc).__name__}") from exc


# Pauses before retrying a write after the app ran. Such writes are safe to repeat (fenced by
# the claim's token, and complete is idempotent for its own token), and losing one costs a
# second run of the request after the lease, so one blip of the store should not.
WRITE_RETRY_DELAYS = (0.05, 0.25)


async def _after_the_app(write: Callable[[], Awaitable[object]], limit: float | None) -> object:
    for delay in WRITE_RETRY_DELAYS:
        try:
            return await _call_store(write(), limit)
        except StoreUnavailable as exc:
            log.warning("oncely: store write failed, retrying in %g s: %s", delay, exc)
            await asyncio.sleep(delay)
    return await _call_store(write(), limit)


class _Renewal:
    """Renews a claim's lease every third of it while the app runs.

    Nothing is scheduled but a timer: a request that ends within a third of its lease costs no
    store round trip for renewal.
    """

    def __init__(self, store: AsyncStore, claim: Claimed, lease: float, timeout: float) -> None:
        self._store, self._claim, self._lease, self._timeout = store, claim, lease, timeout
        self._interval = max(lease / 3, 0.05)
        loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = loop.call_later(self._interval, self._start)
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._handle = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                owned = await _call_store(
                    self._store.renew(self._claim, lease=self._lease), self._timeout
                )
            except StoreUnavailable as exc:
                log.warning("oncely: lease renewal failed, will retry: %s", exc)
                owned = True
            if not owned:
                log.warning("oncely: lease lost to another claim of key %s", self._claim.key)
                return
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def adrive(
    flow: Flow, store: AsyncStore, run_app: RunApp, *, lease: float, store_timeout: float
) -> Outcome:
    """Run ``flow`` to its outcome, doing its operations against ``store`` and ``run_app``."""
    # Stores in this process (memory, SQLite) bound their own waits (SQLite's busy_timeout);
    # a timer per operation would cost more than the operation.
    limit: float | None = None if getattr(store, "in_process", False) else store_timeout
    send = flow.send
    value: object = None
    while True:
        try:
            op = send(value)
        except StopIteration as done:
            outcome: Outcome = done.value
            return outcome
        send = flow.send
        try:
            if isinstance(op, Claim):
                value = await _call_store(
                    store.claim(op.key, op.fingerprint, lease=op.lease), limit
                )
            elif isinstance(op, Run):
                renewal = (
                    None if op.claim is None else _Renewal(store, op.claim, lease, store_timeout)
                )
                try:
                    value = await run_app(op.claim)
                finally:
                    if renewal is not None:
                        await renewal.stop()
            elif isinstance(op, Complete):
                value = await _after_the_app(
                    functools.partial(
                        store.complete,
                        op.claim,
                        op.response,
                        ttl=op.ttl,
                        tombstone_ttl=op.tombstone_ttl,
                    ),
                    limit,
                )
            elif isinstance(op, Release):
                value = await _after_the_app(functools.partial(store.release, op.claim), limit)
            else:
                assert isinstance(op, Sleep)
                await asyncio.sleep(op.seconds)
                value = None
        except StoreUnavailable as exc:
            send, value = flow.throw, exc  # type: ignore[assignment]
