"""The chaos demo: a small run with a crash passes its audit, and the audit can fail.

The end-to-end tests share one small run (60 intents, one SIGKILL). The planted-fault tests
copy its database, plant a fault in the copy's ledger, serve the copy and audit it again.
The audit's other checks, and the faulty network, are tested without the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from oncely_payments.audit import ApiLedger, AuditReport, Intent, Kind, Outcome, audit
from oncely_payments.chaos import LOOPBACK, Faults, FaultyNetwork, ServiceProcess
from oncely_payments.demo import (
    DemoConfig,
    DemoResult,
    crash_points,
    parse_args,
    run,
    service_command,
    verdict,
)

SMALL = DemoConfig(
    intents=60,
    concurrency=8,
    tenants=2,
    crashes=1,
    seed=20261128,
    burst_rate=0.1,
    card_latency_ms=10.0,
    lease=2.0,
)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


# ---------------------------------------------------------------------------------------------
# A small run, end to end


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    workdir = tmp_path_factory.mktemp("demo")
    return asyncio.run(run(replace(SMALL, workdir=workdir), quiet()))


@pytest.mark.slow
def test_a_small_run_with_a_crash_passes_its_audit(small_run: DemoResult) -> None:
    """60 payments through every fault and one SIGKILL: each once, every client told so."""
    report = small_run.report
    assert report.problems == []
    assert report.payments == 60
    assert report.charges == 60
    assert small_run.stats.crashes == 1
    assert small_run.stats.finished == 60
    assert {o.status for o in small_run.outcomes.values()} <= {201, 402}
    assert all(o.payment_id is not None for o in small_run.outcomes.values())
    console = quiet()
    assert verdict(small_run, console) == 0
    assert isinstance(console.file, io.StringIO)
    printed = console.file.getvalue()
    assert "duplicates found" in printed
    assert "audit passed" in printed


def _copy_database(result: DemoResult, to: Path) -> Path:
    """A consistent copy of the run's SQLite database (ledger and idempotency records)."""
    source = result.workdir / "payments.db"
    target = to / "payments.db"
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)
    return target


@contextlib.asynccontextmanager
async def _serve(result: DemoResult, database: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The service on ``database``, and a client straight to it (no faults)."""
    workdir = database.parent
    command = service_command(result.config, f"sqlite:{database}", workdir)
    service = ServiceProcess(command, workdir / "service.log", workdir)
    try:
        await service.start()
        async with httpx.AsyncClient(base_url=service.url, trust_env=False) as client:
            yield client
    finally:
        await service.stop()


async def _audit_copy(result: DemoResult, database: Path) -> AuditReport:
    async with _serve(result, database) as client:
        return await audit(result.intents, result.outcomes, ApiLedger(client))


def _normal_intent(result: DemoResult) -> Intent:
    return next(i for i in result.intents if i.kind is Kind.NORMAL)


def _payments_of(database: Path, customer: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return conn.execute(
            "SELECT id, tenant, customer, amount, currency, status FROM payments "
            "WHERE customer = ?",
            (customer,),
        ).fetchall()


@pytest.mark.slow
async def test_the_audit_fails_when_a_duplicate_payment_is_planted(
    small_run: DemoResult, tmp_path: Path
) -> None:
    """A second succeeded payment for one intent, written straight into the ledger."""
    database = _copy_database(small_run, tmp_path)
    intent = _normal_intent(small_run)
    [(_, tenant, customer, amount, currency, status)] = _payments_of(database, intent.customer)
    assert status == "succeeded"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute(
            "INSERT INTO payments (id, tenant, customer, amount, currency, status, created, "
            "updated) VALUES (?, ?, ?, ?, ?, 'succeeded', 0, 0)",
            (f"pay_{uuid.uuid4().hex[:24]}", tenant, customer, amount, currency),
        )

    report = await _audit_copy(small_run, database)

    assert not report.ok
    assert len(report.duplicates) == 1
    assert f"intent {intent.number} ({intent.customer}): 2 payments" in report.duplicates[0]
    assert report.problems == report.duplicates
    console = quiet()
    assert verdict(replace(small_run, report=report), console) == 1


@pytest.mark.slow
async def test_the_audit_fails_when_a_payment_is_lost(
    small_run: DemoResult, tmp_path: Path
) -> None:
    """One intent's payment removed from the ledger: the audit reports it lost."""
    database = _copy_database(small_run, tmp_path)
    intent = _normal_intent(small_run)
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        deleted = conn.execute("DELETE FROM payments WHERE customer = ?", (intent.customer,))
        assert deleted.rowcount == 1

    report = await _audit_copy(small_run, database)

    assert not report.ok
    assert report.lost == [
        f"intent {intent.number} ({intent.customer}): lost: no payment in the ledger"
    ]
    assert report.problems == report.lost


# ---------------------------------------------------------------------------------------------
# The audit's checks, on a ledger in a dict


class DictLedger:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def payments(self, tenant: str, customer: str | None = None) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.rows
            if r["tenant"] == tenant and customer in (None, r["customer"])
        ]


def _intent(number: int, kind: Kind = Kind.NORMAL) -> Intent:
    prefix = {Kind.NORMAL: "cus", Kind.DECLINE: "cus_decline", Kind.FLAKY: "cus_flaky"}[kind]
    return Intent(number, "sk_t", str(uuid.uuid4()), f"{prefix}_{number}", 100 + number, kind)


def _clean(intents: list[Intent]) -> tuple[list[dict[str, Any]], dict[int, Outcome]]:
    rows, outcomes = [], {}
    for i in intents:
        pid = f"pay_{i.number}"
        rows.append(
            {
                "tenant": i.tenant,
                "id": pid,
                "amount": i.amount,
                "currency": "EUR",
                "customer": i.customer,
                "status": i.ledger_status,
            }
        )
        outcomes[i.number] = Outcome(i.final_status, pid, {pid}, requests=1)
    return rows, outcomes


@pytest.fixture
def intents() -> list[Intent]:
    return [_intent(0), _intent(1, Kind.DECLINE), _intent(2, Kind.FLAKY)]


async def test_the_audit_passes_a_ledger_that_matches_the_intents(intents: list[Intent]) -> None:
    rows, outcomes = _clean(intents)
    charges = {i.customer: [i.charge_outcome] for i in intents}
    report = await audit(intents, outcomes, DictLedger(rows), charges=charges)
    assert report.ok
    assert (report.intents, report.payments, report.charges) == (3, 3, 3)


async def test_the_audit_fails_when_a_client_was_told_another_payment(
    intents: list[Intent],
) -> None:
    rows, outcomes = _clean(intents)
    outcomes[0].ids_seen.add("pay_other")  # a burst copy was answered with another payment
    report = await audit(intents, outcomes, DictLedger(rows))
    assert report.inconsistent == [
        "intent 0 (cus_0): clients were told ['pay_other'], the ledger has pay_0"
    ]


async def test_the_audit_fails_on_a_wrong_status_amount_or_answer(intents: list[Intent]) -> None:
    rows, outcomes = _clean(intents)
    rows[1]["status"] = "succeeded"  # a declined card charged
    rows[2]["amount"] = 1  # the flaky customer charged another amount
    outcomes[0] = Outcome()  # never answered
    report = await audit(intents, outcomes, DictLedger(rows))
    assert len(report.wrong) == 2
    assert report.answers == ["intent 0 (cus_0): no final answer"]
    assert not report.ok


async def test_the_audit_fails_on_a_payment_nobody_intended(intents: list[Intent]) -> None:
    rows, outcomes = _clean(intents)
    rows.append({**rows[0], "id": "pay_x", "customer": "cus_nobody"})
    report = await audit(intents, outcomes, DictLedger(rows))
    assert len(report.strays) == 1
    assert "cus_nobody" in report.strays[0]


async def test_the_audit_fails_when_the_card_network_charged_twice(
    intents: list[Intent],
) -> None:
    rows, outcomes = _clean(intents)
    charges = {i.customer: [i.charge_outcome] for i in intents}
    charges["cus_0"] = ["approved", "approved"]
    del charges["cus_flaky_2"]
    report = await audit(intents, outcomes, DictLedger(rows), charges=charges)
    assert report.charged == [
        "intent 0 (cus_0): card network charges ['approved', 'approved'], expected [approved]",
        "intent 2 (cus_flaky_2): card network charges [], expected [approved]",
    ]


# ---------------------------------------------------------------------------------------------
# The faulty network, in front of a tiny server that counts requests


class Upstream:
    """An HTTP/1.1 server on 127.0.0.1 that answers every request 201 and counts them."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            self.requests += 1
            writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(up._serve, LOOPBACK, 0)
    try:
        yield up
    finally:
        up.server.close()
        await up.server.wait_closed()


@contextlib.asynccontextmanager
async def _network(faults: Faults, upstream: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    network = FaultyNetwork(faults, random.Random(1))
    await network.start()
    network.upstream_port = upstream.port
    limits = httpx.Limits(max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(
            base_url=network.url, limits=limits, trust_env=False, timeout=5
        ) as client:
            yield client
    finally:
        await network.close()


async def test_the_network_passes_answers_through(upstream: Upstream) -> None:
    async with _network(Faults(), upstream) as client:
        response = await client.post("/payments", content=b"{}")
    assert (response.status_code, response.text, upstream.requests) == (201, "ok", 1)


async def test_a_dropped_answer_reached_the_server_first(upstream: Upstream) -> None:
    async with _network(Faults(drop=1.0), upstream) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/payments", content=b"{}")
    assert upstream.requests == 1


async def test_the_network_can_send_a_request_twice(upstream: Upstream) -> None:
    async with _network(Faults(duplicate=1.0), upstream) as client:
        response = await client.post("/payments", content=b"{}")
        for _ in range(200):
            if upstream.requests == 2:
                break
            await asyncio.sleep(0.01)
    assert response.status_code == 201
    assert upstream.requests == 2


async def test_a_dead_server_closes_the_clients_connection(upstream: Upstream) -> None:
    async with _network(Faults(), upstream) as client:
        assert upstream.server is not None
        upstream.server.close()
        await upstream.server.wait_closed()
        with pytest.raises(httpx.TransportError):
            await client.post("/payments", content=b"{}")


# ---------------------------------------------------------------------------------------------
# Flags and the crash schedule


def test_the_defaults_are_the_flags_defaults() -> None:
    assert parse_args([]) == DemoConfig()


def test_flags_choose_store_size_and_faults() -> None:
    cfg = parse_args(
        [
            "--store",
            "postgresql://postgres@127.0.0.1:5432/test",
            "--intents",
            "10",
            "--crashes",
            "0",
            "--drop-rate",
            "0.5",
        ]
    )
    assert cfg.store == "postgresql://postgres@127.0.0.1:5432/test"
    assert (cfg.intents, cfg.crashes, cfg.drop_rate) == (10, 0, 0.5)


def test_a_rate_above_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--drop-rate", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err


def test_a_store_the_demo_cannot_run_on_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for store in ("redis://127.0.0.1:6379/0", "bogus://x"):
        with pytest.raises(SystemExit) as exited:
            parse_args(["--store", store])
        assert exited.value.code == 2
        assert "the demo runs on sqlite:PATH or postgresql://" in capsys.readouterr().err
    assert parse_args(["--store", "postgresql://u@h/db"]).store == "postgresql://u@h/db"


def test_crashes_are_spread_over_the_run_in_order() -> None:
    points = crash_points(3, random.Random(4))
    assert points == sorted(points)
    assert all(0.1 < p < 0.85 for p in points)
    assert len({round(p, 6) for p in points}) == 3
