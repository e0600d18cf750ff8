"""The key journal: written before the first attempt, finished on a final answer, refused
when older than the server's retention; and the SQLite file itself."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import httpx
import pytest

from oncely.client import KeyExpiredError, KeyJournal, KeyReusedError, operation

from .conftest import MakeClient
from .support import Service, answer, new_customer, payment

pytestmark = pytest.mark.slow


async def test_the_entry_is_on_disk_before_the_first_attempt_and_finished_after(
    service: Service, make_client: MakeClient, journal_path: Path
) -> None:
    """At the first attempt another connection already reads the key being sent; after the
    201 the entry is finished with that status."""
    customer = new_customer()
    client = make_client(service.url, journal=KeyJournal(journal_path))
    at_first_attempt = []

    def look(request: httpx.Request) -> None:
        with KeyJournal(journal_path) as other:
            at_first_attempt.append((other.get(customer), request.headers["idempotency-key"]))

    client.faults.hook = look
    response = await client.request(
        "POST", "/payments", json=payment(customer), extensions=operation(customer)
    )
    assert response.status_code == 201
    entry, sent = at_first_attempt[0]
    assert entry is not None
    assert entry.key == sent == response.extensions["oncely"]["key"]
    assert entry.finished is None
    with KeyJournal(journal_path) as after:
        done = after.get(customer)
    assert done is not None
    assert done.status == 201
    assert done.finished is not None


async def test_a_new_transport_on_the_same_journal_sends_the_same_key(
    service: Service, make_client: MakeClient, journal_path: Path
) -> None:
    """As a restarted process would: same operation, same key, the server's replay."""
    customer = new_customer()
    answers = []
    for _ in range(2):
        client = make_client(service.url, journal=str(journal_path))
        answers.append(
            await client.request(
                "POST", "/payments", json=payment(customer), extensions=operation(customer)
            )
        )
    reports = [a.extensions["oncely"] for a in answers]
    assert reports[0]["key"] == reports[1]["key"]
    assert [r["replayed"] for r in reports] == [False, True]
    assert len(service.payments(customer)) == 1


async def test_an_unanswered_operation_stays_open(
    service: Service, make_client: MakeClient, journal_path: Path
) -> None:
    """Out of attempts on 503s: not a final answer, so the entry is not finished."""
    customer = new_customer()
    client = make_client(service.url, [answer(503)] * 3, journal=KeyJournal(journal_path))
    response = await client.request(
        "POST", "/payments", json=payment(customer), extensions=operation(customer)
    )
    assert response.extensions["oncely"]["stopped"] == "attempts"
    with KeyJournal(journal_path) as read:
        entry = read.get(customer)
    assert entry is not None
    assert entry.finished is None


async def test_the_same_operation_with_another_body_fails_before_sending(
    service: Service, make_client: MakeClient, journal_path: Path
) -> None:
    customer = new_customer()
    client = make_client(service.url, journal=KeyJournal(journal_path))
    await client.request("POST", "/payments", json=payment(customer), extensions=operation("o"))
    restarted = make_client(service.url, journal=KeyJournal(journal_path))
    with pytest.raises(KeyReusedError, match="operation 'o'") as caught:
        await restarted.request(
            "POST", "/payments", json=payment(customer, 5), extensions=operation("o")
        )
    assert caught.value.operation == "o"
    assert restarted.faults.attempts == 0


async def test_an_entry_older_than_the_servers_retention_is_refused(
    service: Service, make_client: MakeClient, journal_path: Path
) -> None:
    """25 hours later (server_retention 24 h): KeyExpiredError, and nothing is sent."""
    now = [1_000_000.0]
    journal = KeyJournal(journal_path, clock=lambda: now[0])
    customer = new_customer()
    client = make_client(service.url, [answer(503)] * 3, journal=journal)
    await client.request("POST", "/payments", json=payment(customer), extensions=operation("o"))
    now[0] += 25 * 3600
    with pytest.raises(KeyExpiredError, match="server_retention") as caught:
        await client.request("POST", "/payments", json=payment(customer), extensions=operation("o"))
    assert caught.value.operation == "o"
    assert caught.value.age == 25 * 3600
    assert client.faults.attempts == 3
    shorter = make_client(service.url, journal=journal, server_retention=30 * 3600)
    response = await shorter.request(
        "POST", "/payments", json=payment(customer), extensions=operation("o")
    )
    assert response.status_code == 201


def test_forget_and_purge(journal_path: Path) -> None:
    now = [100.0]
    with KeyJournal(journal_path, clock=lambda: now[0]) as journal:
        journal.begin("a", "key-a", None)
        now[0] = 200.0
        journal.begin("b", "key-b", "v1:x")
        assert journal.begin("a", "other", None).key == "key-a"  # the first key stays
        assert journal.purge(older_than=50) == 1
        assert journal.get("a") is None
        assert journal.forget("b") is True
        assert journal.forget("b") is False


def test_the_journal_file_is_sqlite_in_wal_mode(journal_path: Path) -> None:
    with KeyJournal(journal_path) as journal:
        journal.begin("op", "key", None)
    with contextlib.closing(sqlite3.connect(journal_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT operation, key FROM oncely_client_operations").fetchall()
    assert rows == [("op", "key")]
