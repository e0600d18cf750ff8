"""Runs and their ids: a changed input or definition under the same run id is refused (exit 4)
and nothing is sent; a re-run of a finished run sends nothing again; the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oncely.chains.cli import main as chain_main

from .conftest import Cli, Payments, checkout_file, unique


def _run(cli: Cli, chain: Path, customer: str, run_id: str) -> subprocess.CompletedProcess[str]:
    return cli("run", str(chain), "--input", f"customer={customer}", "--run-id", run_id)


def test_a_changed_input_under_the_same_run_id_exits_4_and_sends_nothing(
    cli: Cli, payments: Payments, tmp_path: Path
) -> None:
    chain = checkout_file(tmp_path, payments)
    first, other = unique("cus_first"), unique("cus_other")
    run_id = unique("run")
    killed = cli(
        "run",
        str(chain),
        "--input",
        f"customer={first}",
        "--run-id",
        run_id,
        ONCELY_CHAIN_CRASH_AT="after_send:pay",
    )
    assert killed.returncode != 0
    orders = payments.all_orders()

    refused = _run(cli, chain, other, run_id)
    assert refused.returncode == 4
    assert f"run {run_id!r} was started with other inputs (customer)" in refused.stderr
    refused_resume = cli("resume", run_id, "--input", f"customer={other}")
    assert refused_resume.returncode == 4
    assert payments.all_orders() == orders
    assert payments.orders(other) == []
    assert len(payments.payments(first)) == 1  # paid before the kill

    # The same inputs continue the run (a re-run is a resume): still one of each.
    again = _run(cli, chain, first, run_id)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(payments.orders(first)) == len(payments.payments(first)) == 1


def test_a_changed_definition_under_the_same_run_id_exits_4_and_sends_nothing(
    cli: Cli, payments: Payments, tmp_path: Path
) -> None:
    chain = checkout_file(tmp_path, payments)
    customer, run_id = unique("cus_def"), unique("run")
    killed = cli(
        "run",
        str(chain),
        "--input",
        f"customer={customer}",
        "--run-id",
        run_id,
        ONCELY_CHAIN_CRASH_AT="before_step:pay",
    )
    assert killed.returncode != 0
    chain.write_text(chain.read_text().replace("sku: tea", "sku: mate"))
    orders = payments.all_orders()
    for refused in (cli("resume", run_id), _run(cli, chain, customer, run_id)):
        assert refused.returncode == 4
        assert "another chain definition" in refused.stderr
    assert payments.all_orders() == orders
    assert payments.payments(customer) == []
    fresh = _run(cli, chain, customer, unique("run"))  # a new run is allowed
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr


def test_running_a_finished_run_again_sends_nothing_twice(
    cli: Cli, payments: Payments, tmp_path: Path
) -> None:
    chain = checkout_file(tmp_path, payments)
    customer, run_id = unique("cus_twice"), unique("run")
    assert _run(cli, chain, customer, run_id).returncode == 0
    again = _run(cli, chain, customer, run_id)
    assert again.returncode == 0
    assert again.stdout.count("from the journal") >= 5
    assert len(payments.orders(customer)) == len(payments.payments(customer)) == 1
    listed = cli("list")
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(run_id)]
    assert "passed" in row


def test_exit_codes_for_failures_usage_and_transport(
    payments: Payments,
    tmp_path: Path,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1 a step failed, 2 bad definition or usage, 3 transport failure (in process: the
    exit code is main's return value)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("API_KEY", api_key)
    chain = checkout_file(tmp_path, payments)

    def run(path: Path, *args: str) -> tuple[int, str, str]:
        code = chain_main(["run", str(path), *args])
        out, err = capsys.readouterr()
        return code, out, err

    def variant(name: str, old: str, new: str) -> Path:
        path = tmp_path / name
        path.write_text(chain.read_text().replace(old, new, 1))
        return path

    customer = ["--input", f"customer={unique('cus_codes')}"]
    code, out, _ = run(variant("failing.yaml", "{status: 201}", "{status: 202}"), *customer)
    assert code == 1
    assert "step 'create_order': expected status 202, got 201" in out

    code, _, err = run(chain)
    assert code == 2
    assert "input 'customer' is required" in err
    assert run(tmp_path / "missing.yaml", *customer)[0] == 2
    assert run(chain, *customer, "--input", "nope=1")[0] == 2
    for args in (["resume", "no-such-run"], ["show", "no-such-run"]):
        assert chain_main(args) == 2
        assert "no run 'no-such-run'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        chain_main(["frobnicate"])
    assert usage.value.code == 2

    typo = variant("typo.yaml", "${create_order.order_id}/pay", "${create_ordr.id}/pay")
    code, _, err = run(typo, *customer)
    assert code == 2
    assert "step 'pay': unknown reference ${create_ordr.id}" in err

    code, out, _ = run(variant("down.yaml", payments.url, "http://127.0.0.1:9"), *customer)
    assert code == 3
    assert "ConnectError" in out


def test_help_names_the_default_journal(cli: Cli) -> None:
    for action in ("run", "resume", "show", "list"):
        shown = cli(action, "--help")
        assert shown.returncode == 0
        assert "oncely-chains.db" in shown.stdout


def test_oncely_chain_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['yaml'] = None; from oncely.cli import main; "
        "sys.exit(main(['chain', 'list']))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert ran.returncode == 2
    assert "pip install 'oncely[chains]'" in ran.stderr
