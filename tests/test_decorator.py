"""``@idempotent`` on plain functions: results replayed exactly, payloads fingerprinted,
exceptions released or replayed, concurrent callers (threads, processes) run it once, and a
SIGKILLed caller's key is taken over after its lease."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydantic
import pytest

from oncely import (
    ConfigurationError,
    KeyInFlight,
    KeyReused,
    ResultNotEncodable,
    idempotent,
)
from oncely.stores.memory import AsyncMemoryStore, MemoryStore

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Receipt:
    id: str
    amount: int
    tags: list[str]


class Charge(pydantic.BaseModel):
    id: str
    amount: int
    receipt: Receipt | None = None


FALSY: list[Any] = [0, False, "", [], {}, None, 0.0]


@pytest.mark.parametrize("value", FALSY, ids=repr)
def test_every_falsy_result_replays_exactly_with_its_type(value: Any) -> None:
    runs: Counter[str] = Counter()

    @idempotent(store=MemoryStore(), prefix="tests.falsy", key=lambda k: k)
    def work(k: str) -> Any:
        runs[k] += 1
        return value

    first, again = work("k1"), work("k1")
    assert first == again == value
    assert type(again) is type(value)
    assert runs["k1"] == 1


def test_a_dataclass_and_a_pydantic_model_are_rebuilt_from_the_return_type() -> None:
    runs: Counter[str] = Counter()

    @idempotent(store=MemoryStore(), prefix="tests.models", key=lambda event: event["id"])
    def charge(event: dict[str, Any]) -> Charge:
        runs["charge"] += 1
        return Charge(id=event["id"], amount=5, receipt=Receipt("r1", 5, ["a"]))

    @idempotent(store=MemoryStore(), prefix="tests.receipts", key=lambda n: n)
    def receipt(n: str) -> Receipt:
        runs["receipt"] += 1
        return Receipt(n, 7, ["x", "y"])

    assert charge({"id": "e1"}) == charge({"id": "e1"})
    again = charge({"id": "e1"})
    assert isinstance(again, Charge)
    assert isinstance(again.receipt, Receipt)
    assert receipt("n1") == receipt("n1") == Receipt("n1", 7, ["x", "y"])
    assert runs == {"charge": 1, "receipt": 1}


def test_another_payload_under_the_same_key_raises_key_reused() -> None:
    @idempotent(
        store=MemoryStore(),
        prefix="tests.payload",
        key=lambda order: order["id"],
        payload=lambda order: order,
    )
    def place(order: dict[str, Any]) -> int:
        return 1

    place({"id": "o1", "qty": 1})
    assert place({"qty": 1, "id": "o1"}) == 1  # the same payload, in another key order
    with pytest.raises(KeyReused):
        place({"id": "o1", "qty": 2})


def test_an_exception_releases_the_key_so_a_retry_runs_again() -> None:
    runs: Counter[str] = Counter()

    @idempotent(store=MemoryStore(), prefix="tests.flaky", key=lambda: "k")
    def flaky() -> str:
        runs["flaky"] += 1
        if runs["flaky"] == 1:
            raise ConnectionError("downstream blip")
        return "done"

    with pytest.raises(ConnectionError):
        flaky()
    assert flaky() == "done"
    assert flaky() == "done"
    assert runs["flaky"] == 2


class Declined(Exception):
    pass


def test_a_listed_exception_is_kept_and_raised_again_without_running() -> None:
    runs: Counter[str] = Counter()

    @idempotent(
        store=MemoryStore(), prefix="tests.declined", key=lambda: "k", replay_exceptions=(Declined,)
    )
    def pay() -> str:
        runs["pay"] += 1
        raise Declined("card declined", 402)

    for _ in range(2):
        with pytest.raises(Declined) as raised:
            pay()
        assert raised.value.args == ("card declined", 402)
    assert runs["pay"] == 1


def test_a_result_the_codec_cannot_encode_fails_the_first_call_and_releases() -> None:
    runs: Counter[str] = Counter()

    @idempotent(store=MemoryStore(), prefix="tests.unencodable", key=lambda: "k")
    def opaque() -> object:
        runs["opaque"] += 1
        return object()

    with pytest.raises(ResultNotEncodable):
        opaque()
    with pytest.raises(ResultNotEncodable):
        opaque()
    assert runs["opaque"] == 2


def test_a_user_codec_stores_and_rebuilds_the_result() -> None:
    class Upper:
        def encode(self, value: Any) -> bytes:
            return str(value).upper().encode()

        def decode(self, data: bytes) -> Any:
            return data.decode()

    @idempotent(store=MemoryStore(), prefix="tests.codec", key=lambda: "k", codec=Upper())
    def word() -> str:
        return "hello"

    assert word() == "hello"
    assert word() == "HELLO"


def test_prefix_is_required_and_explicit() -> None:
    with pytest.raises(TypeError):
        idempotent(key=lambda: "k")  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError):
        idempotent(prefix="", key=lambda: "k")


def test_tenants_keep_identical_keys_apart() -> None:
    runs: Counter[str] = Counter()
    store = MemoryStore()

    @idempotent(store=store, prefix="tests.tenants", key=lambda t, k: k, tenant=lambda t, k: t)
    def work(t: str, k: str) -> str:
        runs[t] += 1
        return t

    assert work("a", "k") == "a"
    assert work("b", "k") == "b"
    assert work("a", "k") == "a"
    assert runs == {"a": 1, "b": 1}


async def test_an_async_function_is_deduplicated_too() -> None:
    runs: Counter[str] = Counter()

    @idempotent(store=AsyncMemoryStore(), prefix="tests.async", key=lambda k: k)
    async def work(k: str) -> dict[str, int]:
        runs[k] += 1
        return {"n": 1}

    assert await work("k") == await work("k") == {"n": 1}
    assert runs["k"] == 1


def test_a_concurrent_duplicate_raises_key_in_flight_or_waits() -> None:
    entered, gate = threading.Event(), threading.Event()
    store = MemoryStore()

    @idempotent(store=store, prefix="tests.inflight", key=lambda: "k")
    def slow() -> str:
        entered.set()
        assert gate.wait(10)
        return "first"

    @idempotent(store=store, prefix="tests.inflight", key=lambda: "k", wait=10)
    def patient() -> str:
        return "second"

    result: list[str] = []
    first = threading.Thread(target=lambda: result.append(slow()))
    first.start()
    assert entered.wait(10)
    with pytest.raises(KeyInFlight):
        slow()
    waiter = threading.Thread(target=lambda: result.append(patient()))
    waiter.start()
    gate.set()
    first.join(10)
    waiter.join(10)
    assert result == ["first", "first"]


def test_threads_run_the_function_once(tmp_path: Path) -> None:
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    @idempotent(
        store=f"sqlite:{tmp_path / 'o.db'}", prefix="tests.threads", key=lambda: "k", wait=10
    )
    def work() -> int:
        with lock:
            runs["work"] += 1
        time.sleep(0.2)  # the others arrive while it runs
        return 42

    results: list[int] = []

    def call() -> None:
        barrier.wait()
        results.append(work())

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [42] * 20
    assert runs["work"] == 1


CALLER = """
import os, sys, time, json
from oncely import idempotent

db, ledger, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "hold"

@idempotent(store="sqlite:" + db, prefix="tests.processes", key=lambda: "k", wait=20, lease=1)
def work() -> dict:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (str(os.getpid()) + "\\n").encode())
    os.close(fd)
    if hold:
        time.sleep(3600)  # until SIGKILLed
    time.sleep(0.2)
    return {"by": os.getpid()}

print(json.dumps(work()), flush=True)
"""


def callers(tmp_path: Path, count: int, mode: str) -> list[subprocess.Popen[str]]:
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    args = [sys.executable, str(script), str(tmp_path / "o.db"), str(tmp_path / "ledger"), mode]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return [
        subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)
    ]


@pytest.mark.slow
def test_processes_run_the_function_once(tmp_path: Path) -> None:
    procs = callers(tmp_path, 4, "run")
    outputs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o["by"] for o in outputs}) == 1
    assert len((tmp_path / "ledger").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_sigkilled_callers_key_is_taken_over_after_its_lease(tmp_path: Path) -> None:
    (holder,) = callers(tmp_path, 1, "hold")
    ledger = tmp_path / "ledger"
    deadline = time.monotonic() + 30
    while not (ledger.exists() and ledger.read_text()):
        assert time.monotonic() < deadline, "the holder never ran"
        time.sleep(0.05)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    (retry,) = callers(tmp_path, 1, "run")
    output = json.loads(retry.communicate(timeout=60)[0])
    assert output["by"] == retry.pid
    assert len(ledger.read_text().splitlines()) == 2  # the killed run, then the takeover
