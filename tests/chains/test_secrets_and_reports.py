"""No secret value in the journal, the reports or the console output; the JUnit XML validates
against the usual JUnit schema, and the JSON report round-trips."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import xmlschema

from oncely.chains import (
    RunResult,
    StepResult,
    json_report,
    junit_xml,
    read_json_report,
)

from .conftest import FIXTURES, Cli, Payments, unique

SCHEMA = xmlschema.XMLSchema(FIXTURES / "junit.xsd")

CHAIN = """
variables:
  base: {url}
inputs:
  customer: {{required: true}}
  coupon: {{required: true, secret: true}}
chain:
  - name: create_order
    url: "${{vars.base}}/orders"
    method: POST
    headers:
      Authorization: "Bearer ${{ENV:API_KEY}}"
      Cookie: "session=${{ENV:SESSION}}"
      X-Coupon: "${{inputs.coupon}}"
    payload:
      customer: "${{inputs.customer}}"
      currency: USD
      items: [{{sku: tea, quantity: 1, unit_amount: 450}}]
      note: "coupon ${{inputs.coupon}}"
    capture: {{order_id: /id, note: /note}}
  - name: skipped_refund
    url: "${{vars.base}}/orders/${{create_order.order_id}}"
    method: DELETE
    headers: {{Authorization: "Bearer ${{ENV:API_KEY}}"}}
    condition: {{step: create_order, key_path: status, expected_value: cancelled}}
  - name: check
    url: "${{vars.base}}/orders/${{create_order.order_id}}?token=${{ENV:SESSION}}"
    method: GET
    headers: {{Authorization: "Bearer ${{ENV:API_KEY}}"}}
    expect: {{status: 200, body: {{/note: "wrong ${{inputs.coupon}}"}}}}
    continue_on_error: true
  - name: fetch
    url: "${{vars.base}}/orders/${{create_order.order_id}}"
    method: GET
    headers: {{Authorization: "Bearer ${{ENV:API_KEY}}"}}
"""


def test_no_secret_in_the_journal_the_reports_or_the_console(
    cli: Cli, payments: Payments, tmp_path: Path, api_key: str
) -> None:
    chain = tmp_path / "secret.yaml"
    chain.write_text(CHAIN.format(url=payments.url))
    session, coupon = unique("session_value"), unique("coupon_value")
    run_id = unique("run")
    ran = cli(
        "run",
        str(chain),
        "--run-id",
        run_id,
        "--input",
        f"customer={unique('cus_secret')}",
        "--input",
        f"coupon={coupon}",
        "--report-junit",
        "junit.xml",
        "--report-json",
        "report.json",
        SESSION=session,
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr  # check failed; fetch still ran
    again = cli("resume", run_id, "--input", f"coupon={coupon}", SESSION=session)
    shown = cli("show", run_id)
    listed = cli("list")
    assert "expected " in ran.stdout
    assert "[redacted]" in ran.stdout

    journal = sorted(tmp_path.glob("oncely-chains.db*"))
    assert journal
    places = {
        "stdout": ran.stdout + again.stdout + shown.stdout + listed.stdout,
        "stderr": ran.stderr + again.stderr + shown.stderr + listed.stderr,
        "junit": (tmp_path / "junit.xml").read_text(),
        "json": (tmp_path / "report.json").read_text(),
        **{path.name: path.read_bytes().decode("latin-1") for path in journal},
    }
    for secret in (api_key, session, coupon):
        for place, text in places.items():
            assert secret not in text, f"{secret} in {place}"

    with sqlite3.connect(tmp_path / "oncely-chains.db") as conn:
        (values, digest) = conn.execute(
            "SELECT input_values, inputs FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        (redacted,) = conn.execute(
            "SELECT redacted FROM steps WHERE run_id = ? AND step = 'create_order'", (run_id,)
        ).fetchone()
    assert json.loads(values)["coupon"] is None
    assert digest.startswith("sha256:")
    assert redacted == 1  # the answer echoed the coupon: resume asks the server again


def test_the_junit_report_validates_and_the_json_report_round_trips(
    cli: Cli, payments: Payments, tmp_path: Path
) -> None:
    chain = tmp_path / "secret.yaml"
    chain.write_text(CHAIN.format(url=payments.url))
    ran = cli(
        "run",
        str(chain),
        "--quiet",
        "--input",
        f"customer={unique('cus_report')}",
        "--input",
        "coupon=c0upon",
        "--report-junit",
        "junit.xml",
        "--report-json",
        "report.json",
        SESSION=unique("s"),
    )
    assert ran.returncode == 1
    assert ran.stdout == ""  # --quiet: the failure is told on stderr
    assert "step 'check' failed" in ran.stderr

    xml = (tmp_path / "junit.xml").read_text()
    SCHEMA.validate(xml)
    assert 'tests="4" failures="1" errors="0" skipped="1"' in xml
    assert "<skipped" in xml
    assert "<failure" in xml

    text = (tmp_path / "report.json").read_text()
    result = read_json_report(text)
    assert isinstance(result, RunResult)
    assert json_report(result) == text
    assert [s.state for s in result.steps] == ["ran", "skipped", "failed", "ran"]
    assert result.exit_code == 1


def test_a_transport_error_is_a_junit_error_and_reports_round_trip_in_memory() -> None:
    result = RunResult(
        run_id="r-1",
        chain="demo <&>",
        exit_code=3,
        started=1_800_000_000.0,
        elapsed=1.5,
        steps=(
            StepResult("a", "ran", "POST", "http://x/a", status=201, attempts=1, elapsed=0.25),
            StepResult(
                "b",
                "failed",
                "GET",
                "http://x/b",
                iteration=2,
                attempts=3,
                error='ConnectError: "refused" & <gone>',
                transport_error=True,
            ),
        ),
    )
    xml = junit_xml(result)
    SCHEMA.validate(xml)
    assert 'errors="1"' in xml
    assert 'name="b[2]"' in xml
    assert read_json_report(json_report(result)) == result
