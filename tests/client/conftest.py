"""Fixtures: the reference payments service as a real subprocess, and clients over it.

``client_kind`` runs a test twice, through the sync and the async transport; ``make_client``
builds one with the test's faults, a fake clock and sleep (nothing waits for a backoff), a
random source fixed at 0 unless the test says otherwise, and a retry budget of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely.client import AsyncIdempotentTransport, IdempotentTransport, RetryBudget

from .support import (
    AUTH,
    Action,
    AsyncClient,
    AsyncFaultyTransport,
    Client,
    FakeTime,
    Faults,
    FaultyTransport,
    Service,
    SyncClient,
    running_service,
)

MakeClient = Callable[..., Client]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One payments service for a module's tests (each test pays its own customers)."""
    with running_service(tmp_path_factory.mktemp("payments")) as started:
        yield started


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A payments service whose card network takes 4 s: its first attempts stay in flight."""
    with running_service(tmp_path_factory.mktemp("slow"), card_latency_ms=4000) as started:
        yield started


@pytest.fixture(params=["sync", "async"])
def client_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def make_client(client_kind: str) -> AsyncIterator[MakeClient]:
    made: list[Client] = []

    def make(
        base_url: str,
        script: list[Action] | None = None,
        *,
        fake_time: FakeTime | None = None,
        random: float = 0.0,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> Client:
        faults = Faults(list(script or []))
        clock = fake_time or FakeTime()
        options.setdefault("budget", RetryBudget())
        options.setdefault("random", lambda: random)
        options.setdefault("clock", clock.clock)
        client: Client
        if client_kind == "sync":
            transport = IdempotentTransport(FaultyTransport(faults), sleep=clock.sleep, **options)
            client = SyncClient(
                httpx.Client(transport=transport, base_url=base_url, headers=headers or AUTH),
                faults,
                clock,
            )
        else:
            atransport = AsyncIdempotentTransport(
                AsyncFaultyTransport(faults), sleep=clock.asleep, **options
            )
            client = AsyncClient(
                httpx.AsyncClient(transport=atransport, base_url=base_url, headers=headers or AUTH),
                faults,
                clock,
            )
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.aclose()


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "client.db"
