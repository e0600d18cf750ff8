"""Shared test helpers: an injectable clock, and the rule that a skip under CI is a failure."""

from __future__ import annotations

import os

import pytest

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
