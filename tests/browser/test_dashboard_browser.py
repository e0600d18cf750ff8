"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright with that executable; nothing is installed at run time) watches the payments service
while a scripted burst of real requests goes through it.

The page must show exactly what the clients saw (executed, replayed, in flight, mismatched),
a store latency, the mismatch with a hashed key (never the raw key or API key), no console
error; once over server-sent events, once with ``EventSource`` taken away (the polling
fallback). Where Chromium or Playwright is absent the test skips, and fails under
``ONCELY_REQUIRE_SERVICES=1`` (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from oncely_payments.chaos import LOOPBACK, ServiceProcess

from ..conftest import service_missing

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Page

pytestmark = pytest.mark.slow

API_KEY = "sk_test_browser_tenant_secret"
RAW_KEY_PREFIX = "browser-raw-key-"


def chromium_path() -> str:
    """The system Chromium, or a skip saying how to get it."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        service_missing("playwright is not installed (pip install -e '.[test]')")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        service_missing("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    assert found is not None
    return found


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """The payments service as its own process, on a SQLite file of this test's."""
    command = [
        sys.executable,
        "-m",
        "oncely_payments",
        "--store",
        f"sqlite:{tmp_path / 'payments.db'}",
        "--card-network-db",
        str(tmp_path / "card-network.db"),
        "--host",
        LOOPBACK,
        "--card-latency-ms",
        "60",
        "--log-level",
        "warning",
    ]
    process = ServiceProcess(command, tmp_path / "service.log", tmp_path)
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Watched:
    """A page with everything it logged as an error and every URL it asked for."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    async def text(self, selector: str) -> str:
        return (await self.page.text_content(selector)) or ""


async def open_dashboard(browser: Browser, url: str, *, event_source: bool) -> Watched:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    if not event_source:
        await page.add_init_script("delete window.EventSource;")
    watched = Watched(page)
    await page.goto(url + "/dashboard")
    # The largest decisions-per-second figure the page ever shows, whenever it re-renders.
    await page.evaluate(
        """() => {
          window.maxRate = 0;
          const rate = document.getElementById("rate");
          new MutationObserver(() => {
            const n = Number(rate.textContent.replace(/,/g, ""));
            if (n > window.maxRate) window.maxRate = n;
          }).observe(rate, { childList: true, characterData: true, subtree: true });
        }"""
    )
    await page.wait_for_function(
        "document.getElementById('live').textContent.startsWith('live')", timeout=10_000
    )
    return watched


async def burst(url: str) -> Counter[str]:
    """New keys with concurrent duplicates, their replays, and other payloads under used keys,
    spread over about two seconds; what the clients were answered, as decisions."""
    seen: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def count(response: httpx.Response) -> None:
        status = response.status_code
        if status == 201:
            replayed = response.headers.get("idempotent-replayed") == "true"
            seen["replayed" if replayed else "executed"] += 1
        elif status == 409:
            seen["in_flight"] += 1
        elif status == 422:
            seen["payload_mismatch"] += 1
        else:
            raise AssertionError(f"unexpected {status}: {response.text}")

    async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as client:

        async def pay(key: str, amount: int) -> httpx.Response:
            body = {"amount": amount, "currency": "EUR", "customer": "cus_browser"}
            return await client.post("/payments", json=body, headers={"Idempotency-Key": key})

        for _ in range(6):
            keys = [RAW_KEY_PREFIX + uuid.uuid4().hex for _ in range(4)]
            # Each new key twice at once: one runs, the other is in flight or replayed.
            for response in await asyncio.gather(*(pay(k, 1000) for k in keys + keys)):
                count(response)
            for response in await asyncio.gather(*(pay(k, 1000) for k in keys)):
                count(response)
            count(await pay(keys[0], 999))  # the same key, another payload
            await asyncio.sleep(0.3)
    return seen


async def check_numbers(watched: Watched, seen: Counter[str]) -> None:
    """The page shows what the clients saw, and a store latency."""
    total = sum(seen.values())
    page = watched.page
    await page.wait_for_function(
        "([total, sub]) => document.getElementById('total').textContent === total"
        " && document.getElementById('replay-sub').textContent === sub",
        arg=[
            f"{total} decisions since start",
            f"{seen['replayed']} replayed · {seen['executed']} executed",
        ],
        timeout=10_000,
    )
    ratio = seen["replayed"] / (seen["replayed"] + seen["executed"])
    assert await watched.text("#replay") == f"{ratio * 100:.1f} %"
    assert re.fullmatch(r"\d+\.\d\d ms", await watched.text("#p50"))
    assert float((await watched.text("#p50")).split()[0]) > 0
    p99 = await watched.text("#p99")
    assert re.fullmatch(r"p50 · p99 \d+\.\d\d ms · \d+ samples", p99), p99
    assert int(p99.split(" · ")[-1].split()[0]) >= total  # every decision waited on the store
    legend = await watched.text("#legend")
    for outcome, n in seen.items():
        assert f"{outcome} {n}" in legend, legend
    # The store's own count: every key that ran is completed (from store.stats()).
    await page.wait_for_function(
        "(n) => document.getElementById('store').textContent"
        ".includes('completed (replayable)' + n)",
        arg=str(seen["executed"]),
        timeout=5_000,
    )
    assert await watched.text("#inflight") == "0"
    # Mismatches (and duplicates in flight) are listed, with hashed keys only.
    rows = await page.locator("#recent tr").all_inner_texts()
    assert len(rows) - 1 == min(seen["payload_mismatch"] + seen["in_flight"], 12), rows
    assert "payload_mismatch" in rows[1], rows  # the newest first: each round ends with one
    mismatches = [r for r in rows[1:] if "payload_mismatch" in r]
    for row in mismatches:
        assert "POST /payments" in row
        assert "422" in row
        assert re.search(r"\b[0-9a-f]{16}\b", row), row
    html = await page.content()
    assert RAW_KEY_PREFIX not in html
    assert API_KEY not in html
    assert await page.evaluate("window.maxRate") > 0  # decisions per second, while it lasted


async def test_the_dashboard_shows_a_burst_live_in_chromium(
    service: ServiceProcess, browser: Browser, tmp_path: Path
) -> None:
    """Over server-sent events, and by polling where EventSource is missing: the numbers of
    a real burst, no console error, and a screenshot."""
    live = await open_dashboard(browser, service.url, event_source=True)
    polled = await open_dashboard(browser, service.url, event_source=False)
    assert await live.text("#total") == "no decision yet" or "0 decisions" in await live.text(
        "#total"
    )
    seen = await burst(service.url)
    assert seen["executed"] == 24
    assert seen["payload_mismatch"] == 6
    assert seen["replayed"] + seen["in_flight"] == 48  # each key's duplicate and its replay
    for watched in (live, polled):
        await check_numbers(watched, seen)
    assert await live.text("#live") == "live"
    assert any(u.endswith("/dashboard/events") for u in live.requests)
    assert not any("snapshot.json" in u for u in live.requests)
    assert await polled.text("#live") == "live (polling)"
    assert not any(u.endswith("/dashboard/events") for u in polled.requests)
    assert sum("/dashboard/snapshot.json" in u for u in polled.requests) >= 2
    shot = tmp_path / "dashboard.png"
    await live.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert live.errors == []
    assert polled.errors == []
