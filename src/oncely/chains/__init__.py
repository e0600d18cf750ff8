"""API chains that run once: the output of one call feeds the next, and a crashed run resumes
without repeating an effect.

    from oncely.chains import load_chain, run_chain

    result = run_chain(load_chain("checkout.yaml"), {"customer": "cus_1"}, run_id="r1")
    result.exit_code, [(s.name, s.state) for s in result.steps]

Needs the ``chains`` extra (``pip install 'oncely[chains]'``). The CLI: ``oncely chain``.
"""

from __future__ import annotations

try:
    import dotenv as _dotenv  # noqa: F401
    import jsonpath as _jsonpath  # noqa: F401
    import yaml as _yaml  # noqa: F401

    from ..client import IdempotentTransport as _IdempotentTransport  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"oncely.chains needs its extra ({exc.name} is missing): pip install 'oncely[chains]'"
    ) from exc

from ._http import chain_key
from ._journal import DEFAULT_JOURNAL, Journal, RunRecord, StepRecord
from ._loader import UNSUPPORTED, load_chain, parse_chain
from ._model import (
    Capture,
    Chain,
    ChainError,
    Condition,
    DefinitionError,
    Expect,
    Input,
    Polling,
    Retry,
    Step,
)
from ._refs import UnknownReference
from ._report import json_report, junit_xml, read_json_report
from ._results import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TRANSPORT,
    EXIT_USAGE,
    Event,
    ResumeRefused,
    RunResult,
    StepFinished,
    StepResult,
    StepStarted,
)
from ._runner import HOOK_POINTS, arun_chain, run_chain

__all__ = [
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
