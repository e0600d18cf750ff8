"""The pure parts: options checked with errors that name them, backoff, Retry-After, the
deadline's clipping, the retry budget's arithmetic, which errors prove nothing was sent."""

from __future__ import annotations

import httpx
import pytest

from oncely import ConfigurationError, OncelyError
from oncely.client import (
    AsyncIdempotentTransport,
    IdempotentTransport,
    RetryBudget,
    RetryPolicy,
)
from oncely.client._policy import (
    TooLong,
    backoff,
    clip_timeouts,
    error_kind,
    next_step,
    parse_retry_after,
)

from .support import http_date


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"deadline": -1}, "deadline"),
        ({"deadline": 0}, "deadline"),
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.5}, "attempts"),
        ({"base": -0.1}, "base"),
        ({"cap": float("nan")}, "cap"),
        ({"retry_after_max": -5}, "retry_after_max"),
        ({"statuses": [700]}, "statuses"),
        ({"idempotent_methods": "GET"}, "idempotent_methods"),
        ({"retries": 3}, "retries"),
    ],
)
def test_a_bad_policy_option_is_named(options: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        RetryPolicy(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", [IdempotentTransport, AsyncIdempotentTransport])
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"key_format": "uuid"}, "key_format"),
        ({"max_body": -1}, "max_body"),
        ({"server_retention": 0}, "server_retention"),
        ({"methods": ["PO ST"]}, "methods"),
        ({"header": ""}, "header"),
        ({"budget": 10}, "budget"),
        ({"journal": 42}, "journal"),
        ({"policy": {"attempts": 3}}, "policy"),
        ({"retries": 3}, "retries"),
    ],
)
def test_a_bad_transport_option_is_named(
    transport: type[object], options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        transport(**options)


def test_an_unknown_option_is_also_the_type_error_python_would_raise() -> None:
    with pytest.raises(TypeError, match="deadlin") as caught:
        RetryPolicy(deadlin=5)  # type: ignore[arg-type]
    assert isinstance(caught.value, OncelyError)
    assert "deadline" in str(caught.value)  # the options are listed


@pytest.mark.parametrize(
    ("extension", "named"),
    [
        ({"operaton": "x"}, "operaton"),
        ({"operation": ""}, "operation"),
        ({"operation": 42}, "operation"),
        ({"key": "my-key"}, "key"),
        ({"policy": 3}, "policy"),
        ("order-42", "dict"),
    ],
)
def test_a_bad_request_extension_is_named_before_sending(extension: object, named: str) -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    inner = httpx.MockTransport(answer)
    with (
        httpx.Client(transport=IdempotentTransport(inner)) as client,
        pytest.raises(ConfigurationError, match=named),
    ):
        client.post("http://api.test/x", extensions={"oncely": extension})
    assert sent == []


def test_full_jitter_backoff() -> None:
    policy = RetryPolicy()
    assert backoff(policy, 0, 500, 0.5) == 0.125
    assert backoff(policy, 3, 500, 1.0) == 2.0
    assert backoff(policy, 0, 429, 1.0) == 1.0
    assert backoff(policy, 1, 503, 1.0) == 2.0
    assert backoff(policy, 10, 500, 1.0) == 10.0  # the cap
    assert backoff(policy, 2000, None, 1.0) == 10.0
    assert backoff(policy, 5, 500, 0.0) == 0.0


def test_retry_after_in_both_forms() -> None:
    date = 1_800_000_000.0
    assert parse_retry_after("7", None, 0.0) == 7.0
    assert parse_retry_after(" 0 ", None, 0.0) == 0.0
    # The HTTP-date is read against the answer's Date, whatever this host's clock says.
    assert parse_retry_after(http_date(date + 30), http_date(date), 5.0) == 30.0
    assert parse_retry_after(http_date(date - 30), http_date(date), 5.0) == 0.0
    # Without a Date, against the wall clock given.
    assert parse_retry_after(http_date(date + 12), None, date) == 12.0
    for nonsense in ("-1", "1.5", "soon", ""):
        assert parse_retry_after(nonsense, None, date) is None
    assert parse_retry_after(None, None, date) is None


def test_timeouts_are_clipped_to_the_time_left() -> None:
    timeout = {"connect": 5.0, "read": None, "write": 20.0, "pool": 1.0}
    assert clip_timeouts(timeout, 2.0) == {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 1.0}
    assert clip_timeouts(timeout, -1.0) == dict.fromkeys(timeout, 0.0)
    assert clip_timeouts(None, 3.0) == dict.fromkeys(("connect", "read", "write", "pool"), 3.0)
    assert clip_timeouts(timeout, None) == timeout


def test_the_budget_is_a_token_bucket_per_origin() -> None:
    """Starts full (10); a retry costs 1; none below 1 token; a success adds 0.1, up to 10."""
    budget = RetryBudget()
    assert all(budget.withdraw("http://a") for _ in range(10))
    assert budget.withdraw("http://a") is False
    assert budget.withdraw("http://b") is True  # another origin, another bucket
    for _ in range(9):
        budget.succeed("http://a")
    assert budget.withdraw("http://a") is False  # 0.9 tokens
    budget.succeed("http://a")
    assert budget.withdraw("http://a") is True
    for _ in range(500):
        budget.succeed("http://b")
    assert budget.tokens("http://b") == 10.0
    with pytest.raises(ConfigurationError, match="cost"):
        RetryBudget(cost=-1)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (httpx.ConnectError("refused"), "not sent"),
        (httpx.ConnectTimeout("slow"), "not sent"),
        (httpx.PoolTimeout("busy"), "not sent"),
        (httpx.ReadTimeout("slow"), "maybe sent"),
        (httpx.WriteTimeout("slow"), "maybe sent"),
        (httpx.ReadError("reset"), "maybe sent"),
        (httpx.WriteError("reset"), "maybe sent"),
        (httpx.RemoteProtocolError("closed"), "maybe sent"),
        (httpx.UnsupportedProtocol("ftp"), None),
        (httpx.LocalProtocolError("bad"), None),
        (ValueError("other"), None),
    ],
)
def test_which_errors_prove_the_request_never_left(error: Exception, kind: str | None) -> None:
    assert error_kind(error) == kind


def _step(policy: RetryPolicy | None = None, **given: object) -> object:
    options: dict[str, object] = {
        "attempts": 1,
        "retryable": True,
        "success": False,
        "replayable": True,
        "status": 500,
        "wait": None,
        "elapsed": 0.0,
        "jitter": 0.5,
    }
    options.update(given)
    return next_step(policy or RetryPolicy(), **options)  # type: ignore[arg-type]


def test_the_next_step_after_an_attempt() -> None:
    """Stop reasons in order: not retryable, out of attempts, body sent once, Retry-After too
    long (RetryLater), a sleep past the deadline; else the larger of Retry-After and backoff."""
    assert _step(retryable=False, success=True) == "success"
    assert _step(retryable=False) == "not_retryable"
    assert _step(attempts=3) == "attempts"
    assert _step(replayable=False) == "not_retryable"
    assert _step(wait=61.0) == TooLong(61.0)
    assert _step(wait=20.0) == 20.0
    assert _step(RetryPolicy(deadline=None), wait=60.0) == 60.0
    assert _step(RetryPolicy(deadline=None), wait=60.5) == TooLong(60.5)
    assert _step(wait=10.0, elapsed=25.0) == TooLong(10.0)
    assert _step(elapsed=29.9) == "deadline"  # 0.125 s would end past 30 s
    assert _step(wait=3.0) == 3.0
    assert _step(wait=0.0) == 0.125
