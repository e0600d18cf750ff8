"""Lease renewals behind one timer per event loop: each armed renewal starts at its time, in
its own request's context; a cancelled one never does, and many cancelled ones do not pile up."""

from __future__ import annotations

import asyncio
import contextvars
import time

from oncely._codec import Claimed
from oncely._drive import _AsyncRenewal, _due_on
from oncely._flow import Lease
from oncely.stores.memory import AsyncMemoryStore

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Recording(AsyncMemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.renewed: list[tuple[str, str]] = []

    async def renew(self, claim: Claimed, *, lease: float) -> bool:
        self.renewed.append((claim.key, request_id.get()))
        return await super().renew(claim, lease=lease)


async def _claim(store: Recording, key: str, lease: float) -> tuple[Claimed, Lease]:
    claimed = await store.claim(key, "fp", lease=lease)
    assert isinstance(claimed, Claimed)
    return claimed, Lease(lease, time.monotonic())


async def test_armed_renewals_start_in_order_and_cancelled_ones_never() -> None:
    store = Recording()
    renewals = []
    for key, lease in (("a", 0.3), ("b", 0.6), ("c", 0.3), ("d", 0.3)):
        claim, held = await _claim(store, key, lease)
        token = request_id.set(f"request-{key}")
        try:
            renewals.append(_AsyncRenewal(store, claim, held, 5.0))
        finally:
            request_id.reset(token)
    assert renewals[2].cancel()  # "c" ended before its first renewal
    await asyncio.sleep(0.15)  # a, c and d are due at 0.1 s, b at 0.2 s
    assert [key for key, _ in store.renewed] == ["a", "d"]
    await asyncio.sleep(0.15)
    assert {key for key, _ in store.renewed} == {"a", "b", "d"}  # b at its own interval
    assert "c" not in {key for key, _ in store.renewed}
    assert all(owner == f"request-{key}" for key, owner in store.renewed)
    for renewal in renewals:
        await renewal.stop()
    count = len(store.renewed)
    await asyncio.sleep(0.25)
    assert len(store.renewed) == count  # stopped: nothing renews any more


async def test_cancelled_renewals_are_dropped_from_the_queue() -> None:
    store = Recording()
    claim, held = await _claim(store, "k", 60.0)
    for _ in range(5000):
        assert _AsyncRenewal(store, claim, held, 5.0).cancel()
    due = _due_on(asyncio.get_running_loop())
    assert due._queued <= 2 * 1001  # compacted as the cancelled ones became most of the queue
    assert store.renewed == []


def test_a_finished_event_loop_is_not_kept_by_its_renewals() -> None:
    import gc
    import weakref

    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one_request() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        store = Recording()
        claim, held = await _claim(store, "k", 60.0)
        assert _AsyncRenewal(store, claim, held, 5.0).cancel()

    asyncio.run(one_request())
    asyncio.run(one_request())  # the last loop is remembered; the one before must be free
    gc.collect()
    assert loops[0]() is None
