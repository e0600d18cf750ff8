"""Reports of a run: JUnit XML (one test case per step) and JSON (:meth:`RunResult.to_json`).

JUnit: ``<testsuites>`` with one ``<testsuite>`` named after the chain; a failed step is a
``<failure>`` (an assertion or an HTTP status) or an ``<error>`` (transport failure after the
client's retries), a skipped one ``<skipped>``. The run id and exit code are properties. Every
value is redacted already (see :class:`StepResult`).
"""

from __future__ import annotations

import json
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ._results import RunResult, StepResult

__all__ = ["json_report", "junit_xml", "read_json_report", "write_reports"]


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _case(suite: ET.Element, classname: str, step: StepResult) -> None:
    case = ET.SubElement(
        suite, "testcase", name=step.label, classname=classname, time=_seconds(step.elapsed)
    )
    if step.state == "skipped":
        ET.SubElement(case, "skipped", message=step.error or "skipped")
    elif step.state == "failed":
        tag = "error" if step.transport_error else "failure"
        kind = "transport" if step.transport_error else "assertion"
        element = ET.SubElement(case, tag, message=(step.error or "failed")[:500], type=kind)
        element.text = step.error or "failed"
    status = "-" if step.status is None else str(step.status)
    origin = ", from the journal" if step.journal else ""
    out = ET.SubElement(case, "system-out")
    out.text = (
        f"{step.method} {step.url} -> {status}, {step.state}, attempts {step.attempts}{origin}"
    )


def junit_xml(result: RunResult) -> str:
    """The run as JUnit XML text."""
    tests = len(result.steps)
    failures = sum(1 for s in result.steps if s.state == "failed" and not s.transport_error)
    errors = sum(1 for s in result.steps if s.state == "failed" and s.transport_error)
    skipped = sum(1 for s in result.steps if s.state == "skipped")
    counts = {
        "tests": str(tests),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": str(skipped),
        "time": _seconds(result.elapsed),
    }
    root = ET.Element("testsuites", {"name": result.chain, **counts})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.started or time.time()))
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": result.chain,
            **counts,
            "id": "0",
            "timestamp": stamp,
            "hostname": socket.gethostname() or "localhost",
        },
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("run_id", result.run_id),
        ("exit_code", str(result.exit_code)),
        ("resumed", str(result.resumed).lower()),
    ):
        ET.SubElement(properties, "property", name=name, value=value)
    for step in result.steps:
        _case(suite, result.chain, step)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def json_report(result: RunResult) -> str:
    """The run as JSON text; :func:`read_json_report` reads it back."""
    return json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n"


def read_json_report(text: str) -> RunResult:
    return RunResult.from_json(json.loads(text))


def write_reports(
    result: RunResult, *, junit: str | Path | None = None, json_path: str | Path | None = None
) -> None:
    if junit is not None:
        Path(junit).write_text(junit_xml(result), encoding="utf-8")
    if json_path is not None:
        Path(json_path).write_text(json_report(result), encoding="utf-8")
