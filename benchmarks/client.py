"""What oncely's client transport costs per request, next to plain httpx and httpx-retries.

    python3 benchmarks/client.py              # 5 rounds of 2,000 requests per target
    python3 benchmarks/client.py --quick      # 2 rounds of 500
    python3 benchmarks/client.py --reinstall  # rebuild benchmarks/.venv-client

Creates its own virtualenv (benchmarks/.venv-client: oncely[client] from this checkout,
uvicorn, and httpx-retries from PyPI, which is never a dependency of oncely) and re-runs itself
inside it. Then, with a tiny ASGI server under uvicorn on CPU 0 and the client on CPU 1:

1. Over loopback: sequential POSTs (keep-alive, one client) through plain httpx, oncely's
   transport, and httpx-retries' RetryTransport, sync and async, rounds interleaved (plain,
   oncely, retries, plain, ...). Each target's wall time and client CPU time per request, and
   their ratios to plain httpx of the same round.
2. In process (an inner transport that answers at once): the transport's own CPU per request,
   with no network and no server in the way, the least noisy number.
3. The journal, in process: a named operation per request, kept in memory or in a KeyJournal
   (SQLite, synchronous=FULL: two fsyncs per operation, begin and finish).

Prints the tables and writes them to benchmarks/client-results.md. Nothing is asserted: the
machine is shared, and the numbers carry the noise of that (the spread across rounds is shown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-client"
VENV_PYTHON = VENV / "bin" / "python"
SCRATCH = HERE / ".scratch"
RESULTS = HERE / "client-results.md"
REQUIREMENTS = [f"{ROOT}[client]", "uvicorn", "httpx-retries"]
SERVER_CPU, CLIENT_CPU = "0", "1"
BODY = {"amount": 2599, "currency": "EUR", "customer": "cus_8f2b6c1d4e"}
TARGETS = ("httpx", "oncely", "httpx-retries")


def ensure_venv(reinstall: bool) -> None:
    stamp = VENV / ".requirements"
    wanted = "\n".join(REQUIREMENTS)
    if VENV_PYTHON.exists() and stamp.exists() and stamp.read_text() == wanted and not reinstall:
        return
    print(f"setting up {VENV.relative_to(ROOT)} ...", flush=True)
    if not VENV_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", REQUIREMENTS[0], *REQUIREMENTS[1:]], check=True)
    stamp.write_text(wanted)


# The server: the smallest ASGI app that answers a POST like an API would --------------------

SERVER = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b'{"id":"pay_0123456789","status":"succeeded"}'
    await send({"type": "http.response.start", "status": 201, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: str, command: list[str]) -> list[str]:
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    return ["taskset", "-c", cpu, *command] if pin else command


@contextlib.contextmanager
def server() -> Any:
    SCRATCH.mkdir(exist_ok=True)
    (SCRATCH / "client_bench_app.py").write_text(SERVER)
    port = free_port()
    command = [
        str(VENV_PYTHON), "-m", "uvicorn", "client_bench_app:app", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(pinned(SERVER_CPU, command), cwd=SCRATCH)
    try:
        url = f"http://127.0.0.1:{port}"
        import httpx

        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                httpx.post(url, json=BODY)
                break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# Clients -------------------------------------------------------------------------------------


def sync_client(target: str, url: str, **oncely_options: Any) -> Any:
    import httpx
    from httpx_retries import Retry, RetryTransport

    from oncely.client import IdempotentTransport

    if target == "httpx":
        return httpx.Client(base_url=url)
    if target == "oncely":
        return httpx.Client(base_url=url, transport=IdempotentTransport(**oncely_options))
    # httpx-retries as its README shows, POST allowed so that it has the same job to consider.
    retry = Retry(total=3, allowed_methods=["POST", "GET"])
    return httpx.Client(base_url=url, transport=RetryTransport(retry=retry))


def async_client(target: str, url: str) -> Any:
    import httpx
    from httpx_retries import Retry, RetryTransport

    from oncely.client import AsyncIdempotentTransport

    if target == "httpx":
        return httpx.AsyncClient(base_url=url)
    if target == "oncely":
        return httpx.AsyncClient(base_url=url, transport=AsyncIdempotentTransport())
    retry = Retry(total=3, allowed_methods=["POST", "GET"])
    return httpx.AsyncClient(base_url=url, transport=RetryTransport(retry=retry))


def timed(run: Callable[[], None], n: int) -> tuple[float, float]:
    """(wall µs, this process's CPU µs) per request over ``n`` requests."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


def loopback_sync(target: str, url: str, n: int) -> tuple[float, float]:
    with sync_client(target, url) as client:
        for _ in range(50):
            client.post("/payments", json=BODY)

        def run() -> None:
            for _ in range(n):
                client.post("/payments", json=BODY)

        return timed(run, n)


def loopback_async(target: str, url: str, n: int) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        async with async_client(target, url) as client:
            for _ in range(50):
                await client.post("/payments", json=BODY)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await client.post("/payments", json=BODY)
            return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6

    return asyncio.run(main())


def in_process(n: int, batches: int = 10) -> dict[str, list[float]]:
    """CPU µs per request through each transport alone (the inner one answers at once), in
    interleaved batches of ``n``; one value per batch."""
    import httpx
    from httpx_retries import Retry, RetryTransport

    from oncely.client import IdempotentTransport, KeyJournal

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"id": "pay_1"})

    inner = httpx.MockTransport(answer)
    path = SCRATCH / f"client-journal-{os.getpid()}.db"
    journal = KeyJournal(path)
    transports: dict[str, httpx.BaseTransport] = {
        "httpx": inner,
        "oncely": IdempotentTransport(inner),
        "httpx-retries": RetryTransport(inner, retry=Retry(total=3, allowed_methods=["POST"])),
        "oncely, operation, in memory": IdempotentTransport(inner),
        "oncely, operation, KeyJournal": IdempotentTransport(inner, journal=journal),
    }
    results: dict[str, list[float]] = {name: [] for name in transports}
    clients = {
        name: httpx.Client(base_url="http://api.test", transport=transport)
        for name, transport in transports.items()
    }
    count = 0
    for batch in range(batches + 1):
        for name, client in clients.items():
            named = "operation" in name
            size = n // 10 if "KeyJournal" in name else n  # fsyncs: fewer of them
            start = time.process_time(), time.perf_counter()
            for _ in range(size):
                count += 1
                ext = {"oncely": {"operation": f"op-{count}"}} if named else None
                client.post("/payments", json=BODY, extensions=ext)
            cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
            if batch:  # the first batch warms up
                results[name].append((wall if "KeyJournal" in name else cpu) / size * 1e6)
    for client in clients.values():
        client.close()
    journal.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return results


def spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"{median:,.0f} (±{(max(values) - min(values)) / 2 / median * 100:.0f}%)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 500 requests")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--reinstall", action="store_true")
    args = parser.parse_args(argv)
    if Path(sys.prefix).resolve() != VENV.resolve():
        ensure_venv(args.reinstall)
        command = [str(VENV_PYTHON), str(Path(__file__).resolve()), *argv]
        os.execv(shutil.which("taskset") or str(VENV_PYTHON), pinned(CLIENT_CPU, command))
    rounds, n = (2, 500) if args.quick else (args.rounds, args.requests)
    started = time.time()
    loop: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with server() as url:
        for round_no in range(rounds):
            for mode, run in (("sync", loopback_sync), ("async", loopback_async)):
                base = run("httpx", url, n)
                for target in TARGETS:
                    result = base if target == "httpx" else run(target, url, n)
                    loop.setdefault((mode, target), []).append(result)
                    ratios.setdefault((mode, target), []).append(
                        (result[0] / base[0], result[1] / base[1])
                    )
            print(f"round {round_no + 1}/{rounds} over loopback done", flush=True)
    local = in_process(n)

    lines = [
        "# Client transport benchmark",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {rounds} rounds of {n} "
        f"sequential POSTs per target, server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}; "
        f"{time.time() - started:.0f} s. Medians, ± half the spread across rounds.",
        "",
        "## Over loopback (keep-alive, one client, a 201 from a tiny uvicorn app)",
        "",
        "| mode | client | wall µs/request | client CPU µs/request | wall ratio | CPU ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (mode, target), values in loop.items():
        r = ratios[(mode, target)]
        lines.append(
            f"| {mode} | {target} | {spread([v[0] for v in values])} | "
            f"{spread([v[1] for v in values])} | {statistics.median(x[0] for x in r):.2f} | "
            f"{statistics.median(x[1] for x in r):.2f} |"
        )
    plain = statistics.median(local["httpx"])
    lines += [
        "",
        "## In process (the inner transport answers at once: the transports' own cost)",
        "",
        f"CPU µs per request, {len(local['httpx'])} interleaved batches of {n}; the KeyJournal "
        "row is wall time (it waits for two fsyncs per operation: begin and finish).",
        "",
        "| client | µs/request | over plain httpx |",
        "|---|---:|---:|",
    ]
    for name, values in local.items():
        cost = statistics.median(values)
        lines.append(f"| {name} | {spread(values)} | {cost - plain:+,.0f} µs |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
