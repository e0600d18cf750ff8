"""A network that delivers every request and loses the answer of its first attempt, after the
server acted: oncely's client retries with the same key, the server replays, and the ledger
shows one effect per step. The same run, sync and async."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx

from oncely.chains import arun_chain, load_chain, run_chain
from oncely.client import RetryBudget

from .conftest import Payments, checkout_file, unique

UNSAFE = {"create_order", "pay", "confirm"}


def _identity(request: httpx.Request) -> tuple[str, str, str | None]:
    return request.method, str(request.url), request.headers.get("idempotency-key")


def _lose(request: httpx.Request) -> httpx.ReadError:
    return httpx.ReadError("the connection dropped after the server answered", request=request)


class LosesFirstAnswers(httpx.BaseTransport):
    """Sends every request to the server; drops the answer of the first attempt of each."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: Counter[tuple[str, str, str | None]] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        self.sent[_identity(request)] += 1
        if self.sent[_identity(request)] == 1:
            response.close()
            raise _lose(request)
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncLosesFirstAnswers(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: Counter[tuple[str, str, str | None]] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        self.sent[_identity(request)] += 1
        if self.sent[_identity(request)] == 1:
            await response.aclose()
            raise _lose(request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _no_sleep(seconds: float) -> None:
    return None


async def _anosleep(seconds: float) -> None:
    return None


def _check(
    payments: Payments,
    customer: str,
    result_steps: tuple[tuple[str, str, int, bool], ...],
    sent: Counter[tuple[str, str, str | None]],
) -> None:
    for name, state, attempts, replayed in result_steps:
        assert attempts == 2, name
        if name in UNSAFE:
            assert (state, replayed) == ("replayed", True), name
        else:
            assert (state, replayed) == ("ran", False), name
    assert sorted(sent.values()) == [2] * 5  # every request reached the server twice
    assert all(key is not None for (method, _, key) in sent if method in ("POST", "PATCH"))
    [(order_id, status, _)] = payments.orders(customer)
    assert status == "fulfilled"
    [(_, amount, payment_status, for_order)] = payments.payments(customer)
    assert (amount, payment_status, for_order) == (900, "succeeded", order_id)


def test_lost_answers_cost_one_effect_per_step(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    customer = unique("cus_lossy")
    network = LosesFirstAnswers()
    result = run_chain(
        load_chain(checkout_file(tmp_path, payments)),
        {"customer": customer},
        journal=tmp_path / "journal.db",
        transport=network,
        client_options={"budget": RetryBudget(), "sleep": _no_sleep},
        env={"API_KEY": api_key},
    )
    assert result.exit_code == 0, result.steps
    steps = tuple((s.name, s.state, s.attempts, s.replayed) for s in result.steps)
    _check(payments, customer, steps, network.sent)


async def test_lost_answers_cost_one_effect_per_step_async(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    customer = unique("cus_alossy")
    network = AsyncLosesFirstAnswers()
    result = await arun_chain(
        load_chain(checkout_file(tmp_path, payments)),
        {"customer": customer},
        journal=tmp_path / "journal.db",
        transport=network,
        client_options={"budget": RetryBudget(), "sleep": _anosleep},
        env={"API_KEY": api_key},
    )
    assert result.exit_code == 0, result.steps
    steps = tuple((s.name, s.state, s.attempts, s.replayed) for s in result.steps)
    _check(payments, customer, steps, network.sent)
