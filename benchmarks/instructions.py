"""What watching every decision costs, in instructions: a count no noisy machine can move.

    .venv/bin/python benchmarks/instructions.py                 # off and metrics, the benchmark app
    .venv/bin/python benchmarks/instructions.py --light         # the light handler instead
    .venv/bin/python benchmarks/instructions.py --mode metrics+logs

Each (mode, new keys or replays) runs in process, called straight through ASGI as
``observe.py --app`` does, under valgrind's callgrind twice: with ``--warm`` requests and with
``--warm`` plus ``--requests`` more. The difference of the two totals, over ``--requests``, is
what one request costs, start-up and imports cancelled out. ``PYTHONHASHSEED`` is fixed, so
runs of one build agree to within a few hundred instructions. Instructions are not time: the
same code with cold caches between requests (a server's) takes longer per instruction. But
one build against another, or one mode against another, they show what changed.
Needs valgrind (Debian: apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("off", "metrics", "metrics+logs")


def _child(mode: str, replay: bool, count: int, light: bool) -> None:
    """Run ``count`` requests of one mode in this process (what callgrind counts)."""
    sys.path.insert(0, str(HERE))
    import observe

    target: Any = observe.make_app(mode, bench_app=not light)
    if mode == "metrics+logs":
        observe.logging_for(mode, os.path.join(tempfile.mkdtemp(), "decisions.log"))
    app, body, tenant = target
    length = str(len(body)).encode()

    async def send(message: Any) -> None:
        pass

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def run() -> None:
        for n in range(count):
            key = "instructions-replay" if replay else f"instructions-{n}"
            await app(observe.payment_scope(key, tenant, length), receive, send)

    asyncio.run(run())


def _instructions(mode: str, replay: bool, count: int, light: bool) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        mode,
        "replay" if replay else "new",
        str(count),
        "light" if light else "app",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, kind, count, where = sys.argv[2:6]
        _child(mode, kind == "replay", int(count), where == "light")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--light", action="store_true", help="the light handler, not the app")
    parser.add_argument("--mode", action="append", choices=MODES, help="default: off, metrics")
    parser.add_argument("--warm", type=int, default=200, help="requests before the count")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions.py needs valgrind (Debian: apt-get install valgrind)")
    modes = args.mode or ["off", "metrics"]
    where = "the light handler" if args.light else "the benchmark app"
    print(f"instructions per request, in process, {where} on the memory store")
    for replay in (False, True):
        base: int | None = None
        for mode in modes:
            low = _instructions(mode, replay, args.warm, args.light)
            high = _instructions(mode, replay, args.warm + args.requests, args.light)
            each = (high - low) // args.requests
            added = "" if base is None else f"  +{each - base:,} ({(each - base) / base:.1%})"
            base = each if base is None else base
            label = "replays " if replay else "new keys"
            print(f"  {label} {mode:13} {each:>9,}{added}", flush=True)


if __name__ == "__main__":
    main()
