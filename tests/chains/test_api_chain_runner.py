"""A chain file written for api-chain-runner 2.x runs unchanged against the reference service;
its keys that oncely does not support are refused by name, before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from oncely.chains import UNSUPPORTED, DefinitionError, load_chain, parse_chain

from .conftest import FIXTURES, Cli, Payments, unique

FIXTURE = FIXTURES / "api_chain_runner_checkout.yaml"


def test_the_api_chain_runner_fixture_runs_against_the_service(
    cli: Cli, payments: Payments, tmp_path: Path
) -> None:
    customer = unique("cus_acr")
    ran = cli(
        "run",
        str(FIXTURE),
        "--report-json",
        "report.json",
        PAYMENTS_URL=payments.url,
        CUSTOMER=customer,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    states = [(s["name"], s["state"]) for s in report["steps"]]
    assert states == [
        ("create-order", "ran"),
        ("pay-order", "ran"),
        ("wait-until-paid", "ran"),
        ("cancel-if-declined", "skipped"),
        ("list-payments", "ran"),
    ]
    [(order_id, status, payment_id)] = payments.orders(customer)
    assert status == "paid"
    [(paid_id, amount, _, for_order)] = payments.payments(customer)
    assert (paid_id, amount, for_order) == (payment_id, 900, order_id)
    assert f"data.0.order = {order_id}" in ran.stdout  # print_keys, list indexes too
    assert "data.-1.status = succeeded" in ran.stdout


def _with(key: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(FIXTURE.read_text())
    raw["chain"][1][key] = value
    return raw


UNSUPPORTED_CASES = [
    ("manual", True),
    ("instruction", "Approve the order in the back office"),
    ("print_ref", ["create-order.id"]),
    ("unique_fields", {"customer": "email"}),
    ("eval_keys", {"state": "status"}),
    ("eval_condition", "state == 'succeeded'"),
    ("success_message", "paid"),
    ("failure_message", "not paid"),
    ("extract", {"id": "id"}),
]


@pytest.mark.parametrize(("key", "value"), UNSUPPORTED_CASES, ids=[k for k, _ in UNSUPPORTED_CASES])
def test_unsupported_keys_are_refused_by_name(key: str, value: Any) -> None:
    with pytest.raises(DefinitionError) as refused:
        parse_chain(_with(key, value))
    message = str(refused.value)
    assert f"'{key}'" in message
    assert "'pay-order'" in message
    assert "not supported" in message
    assert UNSUPPORTED[key] in message


def test_the_cli_refuses_an_unsupported_key_with_exit_2_and_sends_nothing(
    cli: Cli, payments: Payments, tmp_path: Path
) -> None:
    chain = tmp_path / "manual.yaml"
    chain.write_text(yaml.safe_dump(_with("manual", True)))
    before = payments.all_orders()
    refused = cli("run", str(chain), PAYMENTS_URL=payments.url, CUSTOMER=unique("cus"))
    assert refused.returncode == 2
    assert "'manual' (api-chain-runner) is not supported" in refused.stderr
    assert payments.all_orders() == before


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda raw: raw.update(web_ui=True), "unknown top-level key(s) ['web_ui']"),
        (lambda raw: raw["chain"][0].update(paylod={}), "unknown key(s) ['paylod']"),
        (lambda raw: raw["chain"][0].pop("url"), "missing required field 'url'"),
        (lambda raw: raw["chain"][0].update(method="FETCH"), "method 'FETCH' is not one of"),
        (lambda raw: raw["chain"][1].update(name="create-order"), "used twice"),
        (
            lambda raw: raw["chain"][0]["retry"].update(retry_on=["4xx"]),
            "retry on ['4xx'] is not supported",
        ),
        (
            lambda raw: raw["chain"][1].update(polling={"interval": 1}),
            "a POST is not repeated",
        ),
        (
            lambda raw: raw["chain"][2]["polling"].pop("expected_values"),
            "polling with 'key_path' requires 'expected_values'",
        ),
        (
            lambda raw: raw["chain"][1]["condition"].update(step="later"),
            "not an earlier step",
        ),
    ],
)
def test_bad_definitions_name_what_is_wrong(change: Any, needle: str) -> None:
    raw = yaml.safe_load(FIXTURE.read_text())
    change(raw)
    with pytest.raises(DefinitionError) as bad:
        parse_chain(raw)
    assert needle in str(bad.value)


def test_the_fixture_reads_as_api_chain_runner_reads_it() -> None:
    chain = load_chain(FIXTURE)
    create, pay, wait, cancel, listing = chain.steps
    assert create.retry is not None
    assert (create.retry.max_attempts, create.retry.delay) == (3, 1.0)
    assert create.print_keys == ("id", "amount")
    assert create.continue_on_error is False
    assert [(c.step, c.key_path, c.expected_value) for c in pay.condition] == [
        ("create-order", "status", "open")
    ]
    assert wait.polling is not None
    assert (wait.polling.interval, wait.polling.key_path) == (1.0, "status")
    assert wait.polling.expected_values == ("paid",)
    assert cancel.unsafe
    assert cancel.condition[0].expected_value == "failed"
    assert listing.retry is not None
    assert listing.retry.max_attempts == 1
