"""Settings: flags win over ONCELY_PAYMENTS_* environment variables, which win over defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oncely_payments import Settings


def test_the_defaults_are_a_sqlite_file_and_loopback() -> None:
    settings = Settings.from_args([], {})
    assert settings == Settings()
    assert settings.store == "sqlite:payments.db"
    assert settings.database == Path("payments.db")
    assert settings.card_network_path == Path("payments-card-network.db")
    assert (settings.host, settings.port, settings.crash_at) == ("127.0.0.1", 8000, None)


def test_environment_variables_and_flags() -> None:
    env = {
        "ONCELY_PAYMENTS_STORE": "sqlite:///var/lib/pay/ledger.db",
        "ONCELY_PAYMENTS_PORT": "9000",
        "ONCELY_PAYMENTS_HOST": "0.0.0.0",
        "ONCELY_PAYMENTS_CARD_LATENCY_MS": "25",
        "ONCELY_PAYMENTS_CARD_FAILURE_RATE": "0.2",
        "ONCELY_PAYMENTS_TTL": "600",
        "ONCELY_PAYMENTS_LEASE": "2.5",
        "ONCELY_PAYMENTS_CRASH_AT": "during_charge",
    }
    settings = Settings.from_args([], env)
    assert settings.database == Path("/var/lib/pay/ledger.db")
    assert settings.card_network_path == Path("/var/lib/pay/ledger-card-network.db")
    assert settings.crash_marker("during_charge") == Path(
        "/var/lib/pay/ledger.crashed-during_charge"
    )
    assert (settings.port, settings.host, settings.card_latency_ms) == (9000, "0.0.0.0", 25.0)
    assert (settings.card_failure_rate, settings.ttl, settings.lease) == (0.2, 600.0, 2.5)
    assert settings.crash_at == "during_charge"

    flagged = Settings.from_args(
        ["--port", "9100", "--store", "postgresql://127.0.0.1:5432/pay", "--lease", "1"], env
    )
    assert (flagged.port, flagged.lease, flagged.dialect) == (9100, 1.0, "postgresql")
    assert flagged.database is None
    assert flagged.card_latency_ms == 25.0


def test_a_ledger_apart_from_the_store_may_use_redis() -> None:
    settings = Settings.from_args(
        ["--store", "redis://127.0.0.1:6379/0", "--store-prefix", "pay:"],
        {"ONCELY_PAYMENTS_DATABASE": "sqlite:/var/lib/pay/ledger.db"},
    )
    assert (settings.store_dialect, settings.dialect) == ("redis", "sqlite")
    assert settings.shares_transaction is False
    assert settings.database == Path("/var/lib/pay/ledger.db")
    assert settings.card_network_path == Path("/var/lib/pay/ledger-card-network.db")
    assert settings.store_prefix == "pay:"
    shared = Settings.from_args(["--store", "postgresql://127.0.0.1:5432/pay"], {})
    assert (shared.shares_transaction, shared.ledger_url) == (True, shared.store)


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "memory:"],
        ["--store", "redis://127.0.0.1:6379/0", "--database", "redis://127.0.0.1:6379/1"],
        ["--store", "sqlite:a.db", "--database", "sqlite:a.db"],
        ["--store", "mongodb://x", "--database", "sqlite:a.db"],
        ["--store", "redis://127.0.0.1:6379/0"],
        ["--store", "sqlite:"],
        ["--port", "0"],
        ["--card-failure-rate", "1.5"],
        ["--card-latency-ms", "-1"],
        ["--lease", "0"],
        ["--crash-at", "somewhere"],
    ],
)
def test_bad_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args(argv, {})
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("store", ["bogus://x", "mongodb://x"])
def test_an_unknown_store_scheme_is_named_as_such(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "give the ledger a database of its own": no database would make it a store."""
    with pytest.raises(SystemExit):
        Settings.from_args(["--store", store], {})
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("oncely serve: error:")
    assert "sqlite:PATH, postgresql://... or redis://HOST:PORT/DB" in err
    assert "--database" not in err


def test_a_bad_environment_variable_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_args([], {"ONCELY_PAYMENTS_PORT": "eighty"})
    assert "ONCELY_PAYMENTS_PORT" in capsys.readouterr().err


def test_the_module_entry_point_documents_its_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oncely_payments", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--store",
        "--host",
        "--port",
        "--card-latency-ms",
        "--card-failure-rate",
        "--ttl",
        "--lease",
        "ONCELY_PAYMENTS_STORE",
    ):
        assert flag in result.stdout


def test_a_sqlite_path_that_cannot_be_opened_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oncely_payments.__main__ import main

    assert main(["--store", f"sqlite:{tmp_path / 'no' / 'such' / 'x.db'}"]) == 2
    assert "the folder must exist" in capsys.readouterr().err
