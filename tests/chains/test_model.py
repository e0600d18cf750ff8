"""The chain model in Python: references and their types, keys, loops, conditions, polling,
continue_on_error; against the real service where a request is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely.chains import (
    Capture,
    Chain,
    Condition,
    DefinitionError,
    Expect,
    Input,
    Journal,
    Polling,
    Step,
    UnknownReference,
    chain_key,
    run_chain,
)
from oncely.chains._runner import load_env
from oncely.client import RetryPolicy

from .conftest import Payments, forward, unique

AUTH = {"Authorization": "Bearer ${ENV:API_KEY}"}
ITEMS = [{"sku": "tea", "quantity": "${inputs.quantity}", "unit_amount": 450}]


def order_step(**extra: Any) -> Step:
    options: dict[str, Any] = {
        "payload": {"customer": "${inputs.customer}", "currency": "USD", "items": ITEMS},
        "expect": Expect(status=(201,)),
        "capture": (
            Capture("order_id", "pointer", "/id"),
            Capture("etag", "header", "etag"),
            Capture("total", "jsonpath", "$.amount"),
            Capture("code", "status"),
            Capture("short", "regex", r'"id":"ord_(\w{6})'),
        ),
        **extra,
    }
    return Step("create_order", "${vars.base}/orders", "POST", headers=AUTH, **options)


def chain_of(payments: Payments, *steps: Step) -> Chain:
    return Chain(
        steps=steps,
        variables={"base": payments.url},
        inputs={"customer": Input(required=True), "quantity": Input(default=2)},
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_references_keep_their_json_type_and_captures_are_typed(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    """A whole-string reference stays an int; one inside a string is rendered into it."""
    customer = unique("cus_model")
    chain = chain_of(
        payments,
        order_step(),
        Step(
            "pay",
            "${vars.base}/orders/${create_order.order_id}/pay",
            "POST",
            headers=AUTH,
            expect=Expect(
                status=(201,),
                body={"/amount": "${create_order.total}", "$.order": "${create_order.id}"},
            ),
        ),
        Step(
            "confirm",
            "${vars.base}/orders/${create_order.order_id}",
            "PATCH",
            headers={**AUTH, "If-Match": "*"},
            payload={
                "status": "fulfilled",
                "note": "total ${create_order.total} (${create_order.code})",
            },
            expect=Expect(body={"/note": "total 900 (201)", "/version": 3}),
        ),
    )
    result = run_chain(
        chain, {"customer": customer}, journal=tmp_path / "j.db", env={"API_KEY": api_key}
    )
    assert result.exit_code == 0, result.steps
    created = result.steps[0]
    assert created.captures["total"] == 900
    assert created.captures["code"] == 201
    assert created.captures["etag"] == f'"{created.captures["order_id"]}.v1"'
    assert created.captures["order_id"].startswith("ord_" + created.captures["short"])
    [(_, amount, _, _)] = payments.payments(customer)
    assert amount == 900


def test_an_unknown_reference_names_the_step_and_nothing_is_sent(
    payments: Payments, tmp_path: Path
) -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={"id": "x"})

    cases = [
        ("${create_ordr.id}", "no earlier step, variable or input is named so"),
        ("${later.id}", "that step comes later"),
        ("${vars.nope}", "no variable 'nope'"),
        ("${inputs.nope}", "no input 'nope' is declared"),
        ("${ENV:ONCELY_TEST_UNSET_VARIABLE}", "environment variable ONCELY_TEST_UNSET_VARIABLE"),
        ("${each.value}", "for steps with for_each"),
        ("${create_order}", "write ${step.path}"),
    ]
    for reference, why in cases:
        chain = chain_of(
            payments,
            order_step(),
            Step("pay", f"${{vars.base}}/x/{reference}", "POST", headers=AUTH),
            Step("later", "${vars.base}/health"),
        )
        with pytest.raises(UnknownReference) as unknown:
            run_chain(
                chain,
                {"customer": "c"},
                journal=tmp_path / "j.db",
                transport=httpx.MockTransport(record),
                env={"API_KEY": "k"},
            )
        assert str(unknown.value).startswith(f"step 'pay': unknown reference {reference}"), why
        assert why in str(unknown.value)
    assert sent == []


def test_keys_are_derived_from_run_step_and_iteration() -> None:
    assert chain_key("r1", "pay") == chain_key("r1", "pay")
    keys = {
        chain_key("r1", "pay"),
        chain_key("r2", "pay"),
        chain_key("r1", "confirm"),
        chain_key("r1", "pay", 0),
        chain_key("r1", "pay", 1),
    }
    assert len(keys) == 5


def test_a_loop_sends_each_item_with_its_own_key_and_a_step_may_set_or_skip_keys(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    customers = [unique("cus_loop") for _ in range(3)]
    seen: list[tuple[str, str | None]] = []

    def spy(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("idempotency-key")))
        return forward(request)

    own_key = unique("own-key")
    chain = Chain(
        variables={"base": payments.url, "customers": customers},
        steps=[
            Step(
                "orders",
                "${vars.base}/orders",
                "POST",
                headers=AUTH,
                for_each="${vars.customers}",
                payload={
                    "customer": "${each.value}",
                    "currency": "USD",
                    "items": [{"sku": "n${each.index}", "quantity": 1, "unit_amount": 100}],
                },
                capture=(Capture("id", "pointer", "/id"),),
            ),
            Step(
                "pay_first",
                "${vars.base}/orders/${orders.0.id}/pay",
                "POST",
                headers=AUTH,
                key=own_key,
            ),
            Step(
                "pay_second",
                "${vars.base}/orders/${orders.id.1}/pay",
                "POST",
                headers=AUTH,
                idempotent=False,
                expect=Expect(status=(400,)),  # the service requires a key
            ),
        ],
    )
    result = run_chain(
        chain,
        run_id="loop-run",
        journal=tmp_path / "j.db",
        transport=httpx.MockTransport(spy),
        env={"API_KEY": api_key},
    )
    assert result.exit_code == 0, result.steps
    assert [s.label for s in result.steps] == [
        "orders[0]",
        "orders[1]",
        "orders[2]",
        "pay_first",
        "pay_second",
    ]
    assert seen[:3] == [("/orders", chain_key("loop-run", "orders", i)) for i in range(3)]
    assert seen[3][1] == own_key
    assert seen[4][1] is None
    for customer in customers:
        assert len(payments.orders(customer)) == 1
    assert len(payments.payments(customers[0])) == 1


def test_conditions_skip_and_continue_on_error_goes_on_with_a_non_zero_exit(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    chain = chain_of(
        payments,
        order_step(),
        Step(
            "never",
            "${vars.base}/orders/${create_order.order_id}/pay",
            "POST",
            headers=AUTH,
            condition=(Condition("create_order", "status", "paid"),),
        ),
        Step(
            "wrong",
            "${vars.base}/orders/${create_order.order_id}",
            headers=AUTH,
            expect=Expect(body={"/status": "paid"}),
            continue_on_error=True,
        ),
        Step("after", "${vars.base}/orders/${create_order.order_id}", headers=AUTH),
        Step("stop", "${vars.base}/orders/nope", headers=AUTH),
        Step("unreached", "${vars.base}/health"),
    )
    result = run_chain(
        chain, {"customer": unique("cus_cond")}, journal=tmp_path / "j.db", env={"API_KEY": api_key}
    )
    assert [(s.name, s.state) for s in result.steps] == [
        ("create_order", "ran"),
        ("never", "skipped"),
        ("wrong", "failed"),
        ("after", "ran"),
        ("stop", "failed"),
    ]
    assert result.exit_code == 1
    wrong = result.steps[2].error or ""
    assert 'expected "paid" at /status, got "open"' in wrong
    assert "GET " in wrong
    assert "authorization: [redacted]" in wrong
    stop = result.steps[4].error or ""
    assert "response 404 Not Found: No such order (There is no order nope" in stop


def test_polling_repeats_a_safe_step_until_its_timeout_on_an_injected_clock(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    clock = Clock()
    chain = chain_of(
        payments,
        order_step(),
        Step(
            "wait",
            "${vars.base}/orders/${create_order.order_id}",
            headers=AUTH,
            polling=Polling(
                interval=2, max_timeout=5, key_path="status", expected_values=("paid",)
            ),
            delay=1.5,
        ),
    )
    result = run_chain(
        chain,
        {"customer": unique("cus_poll")},
        journal=tmp_path / "j.db",
        env={"API_KEY": api_key},
        sleep=clock.sleep,
        clock=clock,
    )
    assert clock.slept == [1.5, 2, 2, 1]  # the delay, then polls at 0, 2, 4 and 5 s
    wait = result.steps[1]
    assert (wait.state, wait.attempts) == ("failed", 4)
    assert "polling timed out after 5s: status is 'open', expected one of ['paid']" in (
        wait.error or ""
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Step("", "http://x"), "every step needs a name"),
        (lambda: Step("vars", "http://x"), "a step name may not"),
        (lambda: Step("a", "http://x", "POST", polling=Polling(1)), "a POST is not repeated"),
        (lambda: Step("a", "http://x", "POST", key="k", idempotent=False), "opt out"),
        (lambda: Step("a", "http://x", capture=(Capture("x", "jsonpath", "id"),)), "'$'"),
        (lambda: Step("a", "http://x", capture=(Capture("x", "regex", "("),)), "bad regex"),
        (lambda: Chain(steps=[]), "at least one step"),
    ],
)
def test_bad_models_are_refused_when_built(build: Any, message: str) -> None:
    with pytest.raises(DefinitionError) as bad:
        build()
    assert message in str(bad.value)


def test_env_comes_from_dotenv_files_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / ".env").write_text('API_KEY="from-beside"\nONLY_BESIDE=1\n')
    (tmp_path / "extra.env").write_text("API_KEY=from-file\nONCELY_TEST_SHADOWED=file\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ONCELY_TEST_SHADOWED", "process")
    chain = Chain(steps=[Step("a", "http://x")], source=folder / "flow.yaml")
    env = load_env(chain)
    assert (env["API_KEY"], env["ONLY_BESIDE"]) == ("from-beside", "1")
    env = load_env(chain, tmp_path / "extra.env")
    assert (env["API_KEY"], env["ONCELY_TEST_SHADOWED"]) == ("from-file", "process")
    with pytest.raises(DefinitionError, match="does not exist"):
        load_env(chain, tmp_path / "missing.env")


def test_a_path_missing_from_a_response_fails_the_run_before_the_step_is_sent(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    sent: list[str] = []

    def spy(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return forward(request)

    chain = chain_of(
        payments,
        order_step(),
        Step("pay", "${vars.base}/orders/${create_order.no.such.path}/pay", "POST", headers=AUTH),
    )
    with Journal(tmp_path / "j.db") as journal:
        with pytest.raises(UnknownReference, match="create_order's value has nothing at"):
            run_chain(
                chain,
                {"customer": unique("cus_path")},
                run_id="r-path",
                journal=journal,
                transport=httpx.MockTransport(spy),
                env={"API_KEY": api_key},
            )
        run = journal.run("r-path")
        steps = journal.steps("r-path")
    assert sent == ["/orders"]
    assert run is not None
    assert (run.state, run.exit_code) == ("failed", 2)
    assert [(s.step, s.state) for s in steps] == [("create_order", "ran"), ("pay", "failed")]


def test_a_failed_step_leaves_the_run_resumable(
    payments: Payments, tmp_path: Path, api_key: str
) -> None:
    """The first run stops at a failed step; the resumed run sends it again with its key."""
    customer = unique("cus_resumable")
    chain = chain_of(
        payments,
        order_step(),
        Step("pay", "${vars.base}/orders/${create_order.order_id}/pay", "POST", headers=AUTH),
        Step("after", "${vars.base}/orders/${create_order.order_id}", headers=AUTH),
    )
    answers = iter([503])

    def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/pay"):
            status = next(answers, None)
            if status is not None:
                return httpx.Response(status, json={"title": "down", "detail": "try later"})
        return forward(request)

    options: dict[str, Any] = {
        "run_id": unique("run"),
        "journal": tmp_path / "j.db",
        "transport": httpx.MockTransport(flaky),
        "env": {"API_KEY": api_key},
        "policy": RetryPolicy(attempts=1),
    }
    first = run_chain(chain, {"customer": customer}, **options)
    assert [(s.name, s.state) for s in first.steps] == [("create_order", "ran"), ("pay", "failed")]
    assert first.exit_code == 1
    assert "response 503 Service Unavailable: down (try later)" in (first.steps[1].error or "")
    resumed = run_chain(chain, {"customer": customer}, **options)
    assert resumed.exit_code == 0
    assert [(s.name, s.state, s.journal) for s in resumed.steps] == [
        ("create_order", "ran", True),
        ("pay", "ran", False),
        ("after", "ran", False),
    ]
    assert len(payments.payments(customer)) == 1


def test_inputs_given_as_text_are_read_as_their_declared_type() -> None:
    assert Input(type="integer").read("n", "3") == 3
    assert Input(type="number").read("n", "2.5") == 2.5
    assert Input(type="boolean").read("b", "true") is True
    assert Input(type="json").read("j", '{"a": [1]}') == {"a": [1]}
    assert Input().read("s", "007") == "007"
    assert Input(type="integer").read("n", 4) == 4  # Python values pass as they are
    for spec, text in ((Input(type="integer"), "three"), (Input(type="boolean"), "1")):
        with pytest.raises(DefinitionError, match="must be of type"):
            spec.read("x", text)
    with pytest.raises(DefinitionError, match="input type 'int' is not one of"):
        Input(type="int")  # type: ignore[arg-type]
