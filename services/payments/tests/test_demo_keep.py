"""`make demo ARGS=--keep`: the demo prints its dashboard's URL, and with --keep the service
stays up after the audit, its dashboard showing the run and the audit, until Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ARGS = ["--intents", "12", "--concurrency", "4", "--crashes", "0", "--seed", "7"]


def test_keep_holds_the_service_and_its_dashboard_up_until_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "oncely_payments.demo", *ARGS, "--workdir", str(tmp_path)]
    proc = subprocess.Popen(
        [*command, "--keep"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "the service stays up:" in line:
                break
        text = "".join(seen)
        printed = re.search(r"dashboard: (http://\S+/dashboard)", text)
        assert printed, text
        kept = re.search(r"the service stays up: (http://\S+/dashboard)", text)
        assert kept, text
        url = kept.group(1)
        assert url == printed.group(1)
        time.sleep(0.5)
        assert proc.poll() is None, "the service did not stay up"
        page = httpx.get(url + "/", timeout=10, trust_env=False)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        snap = httpx.get(url + "/snapshot.json", timeout=10, trust_env=False).json()
        assert snap["totals"]["executed"] >= 12
        audit = snap["panels"]["ledger audit (demo)"]
        assert audit["audit"] == "passed", audit
        assert audit["payments_intended"] == audit["payments_recorded"] == 12, audit
        assert audit["duplicates"] == 0, audit
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, text + rest
        assert "audit" in rest.lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
