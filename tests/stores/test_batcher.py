"""The natural batcher the network stores send their operations through (stores/_async/_io.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from oncely import StoreUnavailable
from oncely.stores._async._io import Batcher
from oncely.stores._sync._io import Batcher as SyncBatcher


class Server:
    """A round trip the test holds open until it lets it go; records every batch it was sent."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    async def send(self, items: Sequence[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"odd {i}") if i < 0 else i * 10 for i in items]


async def test_a_lone_item_goes_out_at_once_and_alone() -> None:
    server = Server()
    batcher: Batcher[int, int] = Batcher(server.send)
    assert await batcher.submit(1) == 10
    assert await batcher.submit(2) == 20
    assert server.batches == [[1], [2]]


async def test_items_that_arrive_while_a_round_trip_is_out_share_the_next() -> None:
    server = Server()
    server.gate.clear()
    batcher: Batcher[int, int] = Batcher(server.send)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert server.batches == [[1]]  # out, and held there
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0)
    assert server.batches == [[1]]  # queued behind it, not sent
    server.gate.set()
    assert await first == 10
    assert [await r for r in rest] == [20, 30, 40, 50, 60]
    assert server.batches == [[1], [2, 3, 4, 5, 6]]


async def test_items_of_one_loop_turn_go_out_together() -> None:
    server = Server()
    batcher: Batcher[int, int] = Batcher(server.send)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert server.batches == [[0, 1, 2, 3, 4]]


async def test_a_batch_is_capped_at_max_size() -> None:
    server = Server()
    batcher: Batcher[int, int] = Batcher(server.send, max_size=3)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert server.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_lanes_bound_the_round_trips_in_flight() -> None:
    server = Server()
    server.gate.clear()
    batcher: Batcher[int, int] = Batcher(server.send, lanes=2)
    tasks = [asyncio.ensure_future(batcher.submit(1))]
    await asyncio.sleep(0)
    tasks.append(asyncio.ensure_future(batcher.submit(2)))
    await asyncio.sleep(0)
    tasks += [asyncio.ensure_future(batcher.submit(i)) for i in (3, 4)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert server.batches == [[1], [2]]  # two lanes out; 3 and 4 wait for one of them
    server.gate.set()
    assert [await t for t in tasks] == [10, 20, 30, 40]
    assert server.batches == [[1], [2], [3, 4]]


async def test_a_failed_round_trip_fails_exactly_its_members() -> None:
    server = Server()
    server.gate.clear()
    batcher: Batcher[int, int] = Batcher(server.send)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    second = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    server.fail = StoreUnavailable("connection reset")
    server.gate.set()
    with pytest.raises(StoreUnavailable):
        await first
    # 2 and 3 went out in the next round trip, which failed too; a later one does not.
    for task in second:
        with pytest.raises(StoreUnavailable):
            await task
    server.fail = None
    assert await batcher.submit(4) == 40
    assert server.batches == [[1], [2, 3], [4]]


async def test_an_item_that_fails_on_its_own_fails_alone() -> None:
    server = Server()
    batcher: Batcher[int, int] = Batcher(server.send)
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(-1), batcher.submit(2), return_exceptions=True
    )
    assert results[0] == 10
    assert results[2] == 20
    assert isinstance(results[1], ValueError)
    assert server.batches == [[1, -1, 2]]


async def test_a_caller_who_stops_waiting_before_its_item_is_sent_takes_it_out() -> None:
    server = Server()
    server.gate.clear()
    batcher: Batcher[int, int] = Batcher(server.send)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(batcher.submit(2))
    kept = asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    server.gate.set()
    assert await first == 10
    assert await kept == 30
    assert gone.cancelled()
    assert server.batches == [[1], [3]]


async def test_a_caller_who_stops_waiting_after_sending_does_not_cut_the_trip_short() -> None:
    server = Server()
    server.gate.clear()
    batcher: Batcher[int, int] = Batcher(server.send)
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert server.batches == [[1, 2]]
    tasks[0].cancel()  # e.g. its store_timeout ran out
    await asyncio.sleep(0)
    server.gate.set()
    assert await tasks[1] == 20
    assert tasks[0].cancelled()


async def test_a_timeout_around_submit_lets_the_caller_go() -> None:
    server = Server()
    server.gate.clear()
    batcher: Batcher[int, int] = Batcher(server.send)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.submit(1), 0.01)
    server.gate.set()
    assert await batcher.submit(2) == 20


def test_bad_sizes_are_refused() -> None:
    async def send(items: Sequence[int]) -> Sequence[int]:
        return list(items)

    with pytest.raises(ValueError, match="at least 1"):
        Batcher(send, max_size=0)
    with pytest.raises(ValueError, match="at least 1"):
        SyncBatcher(lambda items: list(items), lanes=0)


def test_the_blocking_side_sends_each_item_alone() -> None:
    sent: list[list[int]] = []

    def send(items: Sequence[int]) -> Sequence[int | BaseException]:
        sent.append(list(items))
        return [ValueError("odd") if i < 0 else i for i in items]

    batcher: SyncBatcher[int, int] = SyncBatcher(send)
    assert batcher.submit(5) == 5
    with pytest.raises(ValueError, match="odd"):
        batcher.submit(-1)
    assert sent == [[5], [-1]]
