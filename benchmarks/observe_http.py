"""What watching every decision costs over HTTP: requests/s of oncely (memory store, the
benchmark app's payments endpoint) with metrics and decision logs off and on, under wrk.

    .venv/bin/python benchmarks/observe_http.py --quick    # 3 rounds of 3 s per mode
    .venv/bin/python benchmarks/observe_http.py            # 7 rounds of 5 s per mode

One uvicorn server per mode (httptools, uvloop, one worker pinned to CPU 0; wrk with 32
connections pinned to CPU 1); modes alternate round by round, in a reversed order every other
round. Prints the median requests/s of each mode with its min-max, and its cost against off.
Needs wrk (Debian: apt-get install wrk) and the project's virtualenv (make .venv/.installed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("off", "metrics", "metrics+logs")


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
        "BENCH_OBSERVE": mode,
        "BENCH_SCRATCH": str(workdir),
        "BENCH_PREFIX": "observe",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "app:build", "--port", str(port)]
    command += ["--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level"]
    command += ["warning"]
    proc = subprocess.Popen(_pin("0", command), cwd=HERE, env=env)
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


BODY = (HERE / "load.lua").read_text().split("body = [[", 1)[1].split("]]", 1)[0].encode()


def _wrk(port: int, mode: str, seconds: float, replay: bool) -> float:
    nonce = secrets.token_hex(4)
    if replay:  # the 16 keys the replay load cycles over, sent once first
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for n in range(16):
            headers = {
                "Content-Type": "application/json",
                "X-Tenant-Id": "acme",
                "Idempotency-Key": f"{nonce}-{n}",
            }
            conn.request("POST", "/payments", body=BODY, headers=headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 201:
                raise SystemExit(f"the {mode} server answered {answer.status} to a first request")
        conn.close()
    load = "replay" if replay else "new"
    command = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(HERE / "load.lua")]
    command += [f"http://127.0.0.1:{port}", "--", load, nonce, "16", "acme"]
    result = subprocess.run(_pin("1", command), capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            report = json.loads(line[6:])
            errors = sum(report[k] for k in report if k.endswith("errors") or k == "timeouts")
            if errors:
                raise SystemExit(f"wrk saw errors on {mode}: {report}")
            rate: float = report["requests"] / (report["duration_us"] / 1e6)
            return rate
    raise SystemExit(f"wrk printed no BENCH line for {mode}:\n{result.stdout}{result.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s per mode")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    rounds, seconds = (3, 3.0) if args.quick else (7, 5.0)
    scratch = Path(tempfile.mkdtemp(prefix="oncely-observe-http-"))
    servers = {mode: _serve(mode, scratch) for mode in MODES}
    results: dict[tuple[str, bool], list[float]] = {(m, r): [] for m in MODES for r in (0, 1)}
    try:
        for round_ in range(rounds):
            for replay in (False, True):
                for mode in MODES if round_ % 2 == 0 else tuple(reversed(MODES)):
                    rate = _wrk(servers[mode][1], mode, seconds, replay)
                    results[(mode, replay)].append(rate)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{rounds} rounds of {seconds:g} s per mode under wrk; requests/s, median (min-max)")
    for replay in (False, True):
        print("replays" if replay else "new keys")
        base = statistics.median(results[("off", replay)])
        for mode in MODES:
            values = results[(mode, replay)]
            median = statistics.median(values)
            print(
                f"  {mode:<13} {median:8.0f} ({min(values):.0f}-{max(values):.0f})"
                f"  {(1 - median / base) * 100:+5.1f} % vs off"
            )


if __name__ == "__main__":
    main()
