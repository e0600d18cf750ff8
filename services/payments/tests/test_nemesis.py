"""The nemesis: a short run per store passes its audit, and the audit fails when it should.

Each run is the real thing, shortened: two service processes on one store, the clients of
oncely's client, SIGKILLs, pauses past the lease, store connection faults (PostgreSQL) and
duplicated, reordered retries. Then two runs that must fail: a duplicate payment planted into
the ledger before the audit, and a service whose store's writes ignore the fencing token.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from oncely_payments.nemesis import POSTGRES_URL, NemesisConfig, StoreRun, main, run_store

pytestmark = [
    pytest.mark.slow,
    # Connections cut by SIGKILL, SIGSTOP and the store proxy are reset mid-flight; asyncio
    # warns about their transports when they are collected.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_reset_transports() -> Iterator[None]:
    """Collect the transports of reset connections here, under this module's filters, rather
    than in whatever test runs next."""
    yield
    gc.collect()


SHORT = NemesisConfig(
    duration=5.0, processes=2, clients=8, lease=1.0, fault_gap=(0.15, 0.5), card_latency_ms=20
)


def _postgres_or_skip() -> None:
    import psycopg

    from tests.conftest import service_missing

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")


def _store(name: str) -> str:
    if name == "postgresql":
        _postgres_or_skip()
    return name


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_short_run_passes_its_audit_under_every_fault(store: str) -> None:
    run: StoreRun = await run_store(SHORT, _store(store), seed=13)
    assert run.error is None, run.error
    assert run.ok, run.line() + "\n" + "\n".join(run.report.problems[:10] + run.stuck)
    assert run.violations == {"duplicates": 0, "lost": 0, "stuck": 0, "inconsistent": 0, "other": 0}
    assert run.intents > 20
    assert run.report.payments == run.intents
    assert run.faults["pause"] + run.faults["kill"] >= 2, run.faults
    assert run.faults["duplicate"], run.faults
    assert run.faults["reorder"], run.faults
    if store == "postgresql":
        store_faults = (
            run.faults["store-cut"] + run.faults["store-delay"] + run.faults["store-reset"]
        )
        assert store_faults >= 1, run.faults
    assert run.replays > 0
    assert run.retries > 0


async def test_a_planted_duplicate_fails_the_audit() -> None:
    run = await run_store(replace(SHORT, duration=3.0, plant_duplicate=True), "sqlite", seed=14)
    assert run.error is None, run.error
    assert not run.ok
    assert run.violations["duplicates"] == 1
    assert "pay_planted" in run.report.duplicates[0]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_without_fencing_the_audit_finds_duplicates(store: str) -> None:
    unfenced = replace(SHORT, duration=4.0, unfenced=True)
    run = await run_store(unfenced, _store(store), seed=15)
    assert run.error is None, run.error
    assert not run.ok
    assert run.violations["duplicates"] > 0, run.line()


def test_the_command_line_reports_and_exits_1_on_a_violation(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["--store", "mongodb://nowhere"])
    assert usage.value.code == 2
    report = tmp_path / "report.json"
    code = main(
        [
            "--store",
            "sqlite",
            "--duration",
            "1",
            "--processes",
            "1",
            "--lease",
            "0.5",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    [entry] = json.loads(report.read_text())
    assert entry["store"] == "sqlite"
    assert entry["ok"] is True
    assert entry["audit"]["duplicates"] == entry["audit"]["lost"] == entry["audit"]["stuck"] == 0
    assert set(entry) >= {"faults", "requests", "retries", "replays", "intents"}
