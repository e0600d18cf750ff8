"""What watching every decision costs: requests/s with metrics and decision logging on and off.

    .venv/bin/python benchmarks/observe.py --quick             # in process, 5 rounds of 1 s
    .venv/bin/python benchmarks/observe.py                     # in process, 15 rounds of 2 s
    .venv/bin/python benchmarks/observe.py --app --quick       # in process, the benchmark app
    .venv/bin/python benchmarks/observe.py --server --quick    # over HTTP, 3 rounds of 3 s
    .venv/bin/python benchmarks/observe.py --server            # over HTTP, 7 rounds of 5 s
    .venv/bin/python benchmarks/observe.py --server --access-log   # and uvicorn's access log

Three modes, measured in one run, rounds alternated (the order reversed every other round) so
that a machine that slows down slows every mode alike:

- ``off``: no ``on_decision`` hook, ``oncely.decisions`` not enabled (nothing is built);
- ``metrics``: ``oncely.metrics.Metrics`` as the hook;
- ``metrics+logs``: the hook, and one JSON line per decision (``oncely.logs.JSONFormatter``)
  to a file.

With ``--server --access-log``, a fourth: ``access-log``, no hook and no decision log but
uvicorn's own access log (one line per request, its default format) to a file: what the
server's own line per request costs, beside oncely's.

In process (the default), the light handler (a JSON 201) behind ``oncely.asgi`` on the memory
store is called straight through ASGI: no server, no sockets, the worst case for overhead
since nothing else takes time. With ``--app``, the benchmark app of ``--server`` instead
(Starlette, its payments endpoint parsing and validating a 325-byte payment), called the same
way: what a server adds is left out.

With ``--server``, each mode is its own uvicorn server running the benchmark app
(``benchmarks/app.py``: its light payments endpoint behind oncely on the memory store, the mode
given as ``BENCH_OBSERVE``; ``BENCH_ENDPOINT=contract`` for the FastAPI + SQLite one; one worker,
uvloop, httptools, no access log, pinned to CPU 0 where ``taskset`` exists) and wrk, another
process pinned to CPU 1, loads it with ``load.lua`` (32 connections). Needs wrk (Debian:
apt-get install wrk).

Each mode runs with new keys (claim, run, complete) and with replays (claim finds the answer).
Prints, per mode, requests/s (median of the rounds, min-max) and the ratio to ``off``: the
median of each round's ratio to the ``off`` measured beside it, with the min-max of those
ratios; the spread of ``off`` itself round to round is the machine's noise. And the CPU time
per request (in process: the benchmark thread's; over HTTP: the server process's, from /proc),
which other processes sharing the machine disturb much less than requests/s: the microseconds
each mode adds to ``off``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

MODES = ("off", "metrics", "metrics+logs")
ACCESS_LOG = "access-log"  # over HTTP only: uvicorn's access log to a file, oncely off
HERE = Path(__file__).resolve().parent
REPLAY_KEYS = 16
#: per mode, over HTTP: requests wrk gave up on after 2 s
TIMEOUTS = dict.fromkeys((*MODES, ACCESS_LOG), 0)
#: (mode, replay) -> per round: requests/s (wall clock), and CPU microseconds per request
Results = dict[tuple[str, bool], list[tuple[float, float]]]


# -- in process ------------------------------------------------------------------------------

BODY = b'{"amount":100,"currency":"EUR"}'


async def handler(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id":"pay_1","status":"ok"}'})


def make_app(mode: str, bench_app: bool = False) -> tuple[Any, bytes, bytes]:
    """The app of one mode in process, the body it is sent, and its tenant header: the light
    handler behind ``oncely.asgi``, or (``bench_app``) the benchmark app of ``--server``."""
    if bench_app:
        os.environ.update(BENCH_TARGET="oncely", BENCH_STORE="memory", BENCH_PREFIX="observe")
        os.environ.setdefault("BENCH_ENDPOINT", "light")
        os.environ["BENCH_SCRATCH"] = tempfile.mkdtemp(prefix="oncely-observe-")
        os.environ["BENCH_OBSERVE"] = "off" if mode == "off" else "metrics"  # logs: ours
        sys.path.insert(0, str(HERE))
        import app as bench

        return bench.build(), LUA_BODY, b"x-tenant-id"

    from prometheus_client import CollectorRegistry

    from oncely import tenant_from_header
    from oncely.asgi import IdempotencyMiddleware
    from oncely.metrics import Metrics

    hooks = [] if mode == "off" else [Metrics(registry=CollectorRegistry())]
    app = IdempotencyMiddleware(
        handler, store="memory:", tenant=tenant_from_header("X-Tenant"), on_decision=hooks
    )
    return app, BODY, b"x-tenant"


def payment_scope(key: str, tenant_header: bytes, length: bytes) -> dict[str, Any]:
    """The ASGI scope of one payment request with ``key``, from tenant "acme"."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/payments",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"idempotency-key", key.encode()),
            (tenant_header, b"acme"),
            (b"content-type", b"application/json"),
            (b"content-length", length),
        ],
    }


async def rate(
    target: tuple[Any, bytes, bytes], seconds: float, replay: bool, salt: str
) -> tuple[float, float]:
    app, body, tenant_header = target
    length = str(len(body)).encode()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    n = 0
    end = time.perf_counter() + seconds
    start, cpu = time.perf_counter(), time.thread_time()
    while time.perf_counter() < end:
        for _ in range(100):
            key = f"{salt}-replay" if replay else f"{salt}-{n}"
            await app(payment_scope(key, tenant_header, length), receive, send)
            n += 1
        sent.clear()
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return n / wall, cpu / n * 1e6


def logging_for(mode: str, path: str) -> logging.Handler | None:
    from oncely.logs import JSONFormatter

    logger = logging.getLogger("oncely")
    if mode != "metrics+logs":
        logger.setLevel(logging.WARNING)
        return None
    handler = logging.FileHandler(path)
    handler.setFormatter(JSONFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


async def in_process(rounds: int, seconds: float, bench_app: bool) -> Results:
    apps = {m: make_app(m, bench_app) for m in MODES}
    results: Results = {(m, r): [] for m in MODES for r in (False, True)}
    log_path = os.path.join(tempfile.mkdtemp(prefix="oncely-observe-"), "decisions.log")
    for round_ in range(rounds):
        for replay in (False, True):
            for mode in MODES if round_ % 2 == 0 else tuple(reversed(MODES)):
                handler = logging_for(mode, log_path)
                try:
                    salt = f"{mode}-{round_}"
                    results[(mode, replay)].append(await rate(apps[mode], seconds, replay, salt))
                finally:
                    if handler is not None:
                        logging.getLogger("oncely").removeHandler(handler)
                        handler.close()
    return results


# -- over HTTP -------------------------------------------------------------------------------

LUA_BODY = (HERE / "load.lua").read_text().split("body = [[", 1)[1].split("]]", 1)[0].encode()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pin(cpu: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") else command


def _serve(mode: str, scratch: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _port()
    workdir = scratch / mode.replace("+", "-")
    workdir.mkdir()
    env = {
        **os.environ,
        "BENCH_TARGET": "oncely",
        "BENCH_STORE": "memory",
        "BENCH_OBSERVE": "off" if mode == ACCESS_LOG else mode,
        "BENCH_SCRATCH": str(workdir),
        "BENCH_PREFIX": "observe",
        "BENCH_ENDPOINT": os.environ.get("BENCH_ENDPOINT", "light"),
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "app:build", "--port", str(port)]
    command += ["--http", "httptools", "--loop", "uvloop"]
    if mode == ACCESS_LOG:  # uvicorn's access lines go to its stdout: a file here
        command += ["--access-log", "--log-level", "info"]
        out = (workdir / "access.log").open("wb")
    else:
        command += ["--no-access-log", "--log-level", "warning"]
        out = None
    proc = subprocess.Popen(_pin("0", command), cwd=HERE, env=env, stdout=out)
    if out is not None:
        out.close()  # the server holds its own copy
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/_bench")
            conn.getresponse().read()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the {mode} server did not start")


def _cpu(pid: int) -> float:
    """Seconds of CPU the process ``pid`` has used (user and system), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(
    server: tuple[subprocess.Popen[bytes], int], mode: str, seconds: float, replay: bool
) -> tuple[float, float]:
    proc, port = server
    nonce = secrets.token_hex(4)
    if replay:  # the keys the replay load cycles over, sent once first
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for n in range(REPLAY_KEYS):
            headers = {
                "Content-Type": "application/json",
                "X-Tenant-Id": "acme",
                "Idempotency-Key": f"{nonce}-{n}",
            }
            conn.request("POST", "/payments", body=LUA_BODY, headers=headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 201:
                raise SystemExit(f"the {mode} server answered {answer.status} to a first request")
        conn.close()
    load = "replay" if replay else "new"
    cpu = _cpu(proc.pid)
    command = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(HERE / "load.lua")]
    command += [f"http://127.0.0.1:{port}", "--", load, nonce, str(REPLAY_KEYS), "acme"]
    result = subprocess.run(_pin("1", command), capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            report = json.loads(line[6:])
            errors = sum(report[k] for k in report if k.endswith("errors"))
            if errors:
                raise SystemExit(f"wrk saw errors on {mode}: {report}")
            TIMEOUTS[mode] += report["timeouts"]  # answers slower than wrk's 2 s: reported
            used = _cpu(proc.pid) - cpu
            rate: float = report["requests"] / (report["duration_us"] / 1e6)
            return rate, used / report["requests"] * 1e6
    raise SystemExit(f"wrk printed no BENCH line for {mode}:\n{result.stdout}{result.stderr}")


def over_http(rounds: int, seconds: float, modes: tuple[str, ...] = MODES) -> Results:
    if shutil.which("wrk") is None:
        raise SystemExit("--server needs wrk (Debian: apt-get install wrk)")
    scratch = Path(tempfile.mkdtemp(prefix="oncely-observe-http-"))
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: Results = {(m, r): [] for m in modes for r in (False, True)}
    try:
        for mode in modes:
            servers[mode] = _serve(mode, scratch)
        for round_ in range(rounds):
            for replay in (False, True):
                for mode in modes if round_ % 2 == 0 else tuple(reversed(modes)):
                    results[(mode, replay)].append(_wrk(servers[mode], mode, seconds, replay))
        logged = (scratch / "metrics-logs" / "decisions.log").stat().st_size
        print(f"decision log of metrics+logs: {logged:,} bytes")
        if ACCESS_LOG in modes:
            logged = (scratch / ACCESS_LOG / "access.log").stat().st_size
            print(f"uvicorn's access log: {logged:,} bytes")
        if any(TIMEOUTS.values()):
            print(f"requests wrk gave up on after 2 s (an overloaded machine): {TIMEOUTS}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# -- report ----------------------------------------------------------------------------------


def report(where: str, rounds: int, seconds: float, results: Results) -> None:
    print(f"{where}: {rounds} rounds of {seconds:g} s per mode, alternated")
    print("requests/s: median of the rounds (min-max), ratio to off: median of each round's")
    print("ratio to the off beside it (min-max); CPU µs per request: median (min-max), and what")
    print("the mode adds to off's (median of the rounds' differences)")
    for replay in (False, True):
        off = [rate for rate, _ in results[("off", replay)]]
        off_cpu = [cpu for _, cpu in results[("off", replay)]]
        base = statistics.median(off)
        noise = (max(off) - min(off)) / base * 100
        cpu_noise = (max(off_cpu) - min(off_cpu)) / statistics.median(off_cpu) * 100
        kind = "replays" if replay else "new keys"
        print(f"{kind} (off's own spread: {noise:.1f} % of its requests/s, {cpu_noise:.1f} % CPU)")
        for mode in dict.fromkeys(mode for mode, _ in results):
            values = [rate for rate, _ in results[(mode, replay)]]
            cpus = [cpu for _, cpu in results[(mode, replay)]]
            median = statistics.median(values)
            line = f"  {mode:<13} {median:9,.0f} ({min(values):,.0f}-{max(values):,.0f})"
            if mode != "off":
                ratios = [v / o for v, o in zip(values, off, strict=True)]
                ratio = statistics.median(ratios)
                line += f"  x{ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            else:
                line += " " * 22
            line += f"  {statistics.median(cpus):6.1f} µs ({min(cpus):.1f}-{max(cpus):.1f})"
            if mode != "off":
                added = [c - o for c, o in zip(cpus, off_cpu, strict=True)]
                fewer = (1 - statistics.median(off_cpu) / statistics.median(cpus)) * 100
                line += f"  {statistics.median(added):+5.1f} µs"
                line += f" ({fewer:.1f} % fewer requests per CPU second)"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--server", action="store_true", help="uvicorn servers loaded by wrk")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument(
        "--app", action="store_true", help="in process, the benchmark app instead (app.py)"
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="with --server, also uvicorn's access log to a file (oncely off), for scale",
    )
    parser.add_argument("--rounds", type=int, help="rounds per mode")
    parser.add_argument("--seconds", type=float, help="seconds per round")
    args = parser.parse_args()
    if args.server:
        rounds, seconds = (3, 3.0) if args.quick else (7, 5.0)
    else:
        rounds, seconds = (5, 1.0) if args.quick else (15, 2.0)
    rounds, seconds = args.rounds or rounds, args.seconds or seconds
    if args.access_log and not args.server:
        parser.error("--access-log needs --server")
    if args.server:
        modes = (*MODES, ACCESS_LOG) if args.access_log else MODES
        report("over HTTP", rounds, seconds, over_http(rounds, seconds, modes))
    else:
        results = asyncio.run(in_process(rounds, seconds, args.app))
        where = "in process, the benchmark app" if args.app else "in process, the light handler"
        report(where, rounds, seconds, results)


if __name__ == "__main__":
    main()
