"""Shared test helpers: an injectable clock, the rule that a skip under CI is a failure, and
both event loops (asyncio's and uvloop's) for the tests marked ``both_loops``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest
import uvloop

REQUIRE_SERVICES = os.environ.get("ONCELY_REQUIRE_SERVICES") == "1"


class Clock:
    """A clock that moves only when told: lease and TTL tests never sleep."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def service_missing(reason: str) -> None:
    """Skip for a server that is absent; under ONCELY_REQUIRE_SERVICES=1 (CI) fail instead."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (ONCELY_REQUIRE_SERVICES=1: required services must be up)")
    pytest.skip(reason)


@pytest.fixture
def clock() -> Clock:
    return Clock()


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    # What uvicorn runs on whenever uvicorn[standard] is installed; drivers fail differently
    # on it (a closed transport is a RuntimeError, not an OSError).
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``both_loops`` run once on each event loop; the others on asyncio's."""
    if item.get_closest_marker("both_loops") is not None:
        return LOOPS
    return {"asyncio": LOOPS["asyncio"]}
