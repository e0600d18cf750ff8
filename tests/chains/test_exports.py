"""oncely.chains (the extra oncely[chains]) has its own pinned surface; the core never imports
it, and ``oncely chain`` works without loading it into ``import oncely``."""

from __future__ import annotations

import inspect
import subprocess
import sys

import oncely.chains

CHAINS_ALL = [
    "DEFAULT_JOURNAL",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TRANSPORT",
    "EXIT_USAGE",
    "HOOK_POINTS",
    "UNSUPPORTED",
    "Capture",
    "Chain",
    "ChainError",
    "Condition",
    "DefinitionError",
    "Event",
    "Expect",
    "Input",
    "Journal",
    "Polling",
    "ResumeRefused",
    "Retry",
    "RunRecord",
    "RunResult",
    "Step",
    "StepFinished",
    "StepRecord",
    "StepResult",
    "StepStarted",
    "UnknownReference",
    "arun_chain",
    "chain_key",
    "json_report",
    "junit_xml",
    "load_chain",
    "parse_chain",
    "read_json_report",
    "run_chain",
]


def test_oncely_chains_exports_exactly_the_pinned_names() -> None:
    assert oncely.chains.__all__ == CHAINS_ALL
    public = {
        name
        for name, value in vars(oncely.chains).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - {"annotations"} == set(CHAINS_ALL)


def test_chain_errors_are_oncely_errors() -> None:
    assert issubclass(oncely.chains.ChainError, oncely.OncelyError)
    assert issubclass(oncely.chains.UnknownReference, oncely.chains.DefinitionError)
    assert issubclass(oncely.chains.ResumeRefused, oncely.chains.ChainError)


def test_import_oncely_and_its_cli_do_not_import_chains() -> None:
    code = (
        "import sys, oncely, oncely.cli; "
        "banned = {'oncely.chains', 'yaml', 'jsonpath', 'rich'} & set(sys.modules); "
        "sys.exit(str(sorted(banned)) if banned else 0)"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr
