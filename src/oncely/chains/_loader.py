"""YAML chain files: api-chain-runner 2.x's format, read as it reads it, plus oncely's keys.

api-chain-runner's keys: top level ``variables`` and ``chain``; per step ``name``, ``url``,
``method``, ``headers``, ``payload``, ``files``, ``delay``, ``print_keys``, ``condition`` (one
``{step, key_path, expected_value}`` or a list), ``polling`` (``interval``, ``max_timeout``,
``key_path``, ``expected_values``), ``retry`` (``false`` or ``{max_attempts, delay, retry_on |
on}``), ``continue_on_error``. oncely adds ``inputs`` (top level) and per step ``expect``,
``capture``, ``idempotency_key``, ``for_each``, ``timeout``.

Keys oncely does not support are refused by name (:data:`UNSUPPORTED`), never ignored; so is
any key neither format knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import yaml

from ._model import (
    Capture,
    CaptureKind,
    Chain,
    Condition,
    DefinitionError,
    Expect,
    Input,
    Polling,
    Retry,
    Step,
)

__all__ = ["UNSUPPORTED", "load_chain", "parse_chain"]

# api-chain-runner's keys that oncely refuses, and why.
UNSUPPORTED: Mapping[str, str] = {
    "manual": "manual pauses wait for a person at the terminal; a chain runs unattended "
    "(split it in two chains, or resume the run when the manual task is done)",
    "instruction": "it belongs to manual steps, which are not supported",
    "print_ref": "it belongs to manual steps, which are not supported",
    "unique_fields": "field generators make a new body on every run, so a re-run could never "
    "replay the first request; pass such values as --input",
    "eval_keys": "eval_* runs Python expressions from the chain file; use expect",
    "eval_condition": "eval_* runs Python expressions from the chain file; use expect",
    "success_message": "it belongs to eval_condition, which is not supported",
    "failure_message": "it belongs to eval_condition, which is not supported",
    "extract": "api-chain-runner ignores it (legacy); use capture",
}

_TOP_LEVEL = frozenset({"chain", "variables", "inputs", "name"})
_STEP_KEYS = frozenset(
    {
        "name",
        "url",
        "method",
        "headers",
        "payload",
        "files",
        "delay",
        "print_keys",
        "condition",
        "polling",
        "retry",
        "continue_on_error",
        "expect",
        "capture",
        "idempotency_key",
        "for_each",
        "timeout",
    }
)
_CAPTURE_KINDS: tuple[CaptureKind, ...] = ("pointer", "jsonpath", "regex", "header", "status")


def load_chain(path: str | Path) -> Chain:
    """Read a chain file; :class:`DefinitionError` names what is wrong and where."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionError(f"cannot read chain file {str(source)!r}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{source}: not valid YAML: {exc}") from exc
    return parse_chain(raw, name=source.stem, source=source.resolve())


def parse_chain(raw: object, *, name: str = "chain", source: Path | None = None) -> Chain:
    """A chain from the mapping a YAML file holds."""
    if not isinstance(raw, dict) or "chain" not in raw:
        raise DefinitionError("a chain file is a mapping with a top-level 'chain' list of steps")
    unknown = sorted(str(k) for k in raw if k not in _TOP_LEVEL)
    if unknown:
        raise DefinitionError(f"unknown top-level key(s) {unknown}; known: {sorted(_TOP_LEVEL)}")
    entries = raw["chain"]
    if not isinstance(entries, list) or not entries:
        raise DefinitionError("'chain' must be a non-empty list of steps")
    variables = raw.get("variables") or {}
    if not isinstance(variables, dict):
        raise DefinitionError("'variables' must be a mapping")
    steps = [_step(entry, index) for index, entry in enumerate(entries)]
    return Chain(
        steps=steps,
        variables=variables,
        inputs=_inputs(raw.get("inputs") or {}),
        name=str(raw.get("name") or name),
        source=source,
    )


def _inputs(raw: object) -> dict[str, Input]:
    if not isinstance(raw, dict):
        raise DefinitionError("'inputs' must be a mapping of input name to its options")
    inputs = {}
    for name, spec in raw.items():
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise DefinitionError(
                f"input {name!r}: give {{required, secret, default, type}} or nothing"
            )
        unknown = sorted(set(spec) - {"required", "secret", "default", "type"})
        if unknown:
            raise DefinitionError(f"input {name!r}: unknown option(s) {unknown}")
        inputs[str(name)] = Input(
            required=_bool(spec.get("required", False), f"input {name!r}: required"),
            secret=_bool(spec.get("secret", False), f"input {name!r}: secret"),
            default=spec.get("default"),
            type=spec.get("type", "string"),
        )
    return inputs


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise DefinitionError(f"{what} must be true or false, not {value!r}")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DefinitionError(f"{what} must be a number of seconds, not {value!r}")
    return float(value)


def _step(entry: object, index: int) -> Step:
    if not isinstance(entry, dict):
        raise DefinitionError(f"step {index + 1} must be a mapping, not {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DefinitionError(f"step {index + 1} has no 'name'")
    where = f"step {name!r}"
    for key in entry:
        if key in UNSUPPORTED:
            raise DefinitionError(
                f"{where}: {key!r} (api-chain-runner) is not supported by oncely: "
                f"{UNSUPPORTED[key]}"
            )
    unknown = sorted(str(k) for k in entry if k not in _STEP_KEYS)
    if unknown:
        raise DefinitionError(f"{where}: unknown key(s) {unknown}; known: {sorted(_STEP_KEYS)}")
    for required in ("url", "method"):
        if required not in entry:
            raise DefinitionError(f"{where}: missing required field {required!r}")
    headers = entry.get("headers") or {}
    if not isinstance(headers, dict):
        raise DefinitionError(f"{where}: headers must be a mapping")
    key = entry.get("idempotency_key")
    if key is not None and key is not False and not isinstance(key, str):
        raise DefinitionError(f"{where}: idempotency_key is a string, or false to send none")
    print_keys = entry.get("print_keys") or []
    if not isinstance(print_keys, list):
        raise DefinitionError(f"{where}: print_keys must be a list of key paths")
    timeout = entry.get("timeout")
    return Step(
        name=name,
        url=entry["url"],
        method=entry["method"],
        headers=headers,
        payload=entry.get("payload"),
        files=_files(entry.get("files"), where),
        capture=_captures(entry.get("capture"), where),
        expect=_expect(entry.get("expect"), where),
        condition=_conditions(entry.get("condition"), where),
        polling=_polling(entry.get("polling"), where),
        retry=_retry(entry, where),
        delay=_number(entry.get("delay", 0), f"{where}: delay"),
        continue_on_error=_bool(
            entry.get("continue_on_error", False), f"{where}: continue_on_error"
        ),
        key=key if isinstance(key, str) else None,
        idempotent=key is not False,
        for_each=entry.get("for_each"),
        print_keys=tuple(str(k) for k in print_keys),
        timeout=None if timeout is None else _number(timeout, f"{where}: timeout"),
    )


def _files(raw: object, where: str) -> dict[str, str | tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DefinitionError(f"{where}: files maps a field name to a file path (or a list)")
    files: dict[str, str | tuple[str, ...]] = {}
    for name, value in raw.items():
        if isinstance(value, str):
            files[str(name)] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            files[str(name)] = tuple(value)
        else:
            raise DefinitionError(f"{where}: files.{name} must be a path or a list of paths")
    return files


def _captures(raw: object, where: str) -> tuple[Capture, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise DefinitionError(f"{where}: capture maps a name to what to capture")
    captures = []
    for name, spec in raw.items():
        captures.append(_capture(str(name), spec, where))
    return tuple(captures)


def _capture(name: str, spec: object, where: str) -> Capture:
    """``/ptr``, ``$.path``, or ``{pointer|jsonpath|regex|header: expr, secret?}``,
    ``{status: true}``."""
    if isinstance(spec, str):
        if spec.startswith("$"):
            return Capture(name, "jsonpath", spec)
        if spec.startswith("/") or spec == "":
            return Capture(name, "pointer", spec)
        raise DefinitionError(
            f"{where}: capture {name!r}: {spec!r} is neither a JSON Pointer ('/id') nor a "
            "JSONPath ('$.id'); use {regex: ...} or {header: ...} for the others"
        )
    if not isinstance(spec, dict):
        raise DefinitionError(f"{where}: capture {name!r}: give a string or a mapping")
    secret = _bool(spec.get("secret", False), f"{where}: capture {name!r}: secret")
    kinds = [k for k in _CAPTURE_KINDS if k in spec]
    unknown = sorted(set(spec) - set(_CAPTURE_KINDS) - {"secret"})
    if len(kinds) != 1 or unknown:
        raise DefinitionError(
            f"{where}: capture {name!r}: give exactly one of {list(_CAPTURE_KINDS)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    kind = kinds[0]
    expr = spec[kind]
    if kind == "status":
        if expr is not True:
            raise DefinitionError(f"{where}: capture {name!r}: write status: true")
        return Capture(name, "status", "", secret)
    if not isinstance(expr, str):
        raise DefinitionError(f"{where}: capture {name!r}: {kind} must be a string")
    return Capture(name, kind, expr, secret)


def _expect(raw: object, where: str) -> Expect:
    if raw is None:
        return Expect()
    if not isinstance(raw, dict) or set(raw) - {"status", "body"}:
        raise DefinitionError(f"{where}: expect takes status and body")
    status = raw.get("status", [])
    statuses = status if isinstance(status, list) else [status]
    for code in statuses:
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise DefinitionError(f"{where}: expect status {code!r} is not an HTTP status code")
    body = raw.get("body") or {}
    if not isinstance(body, dict):
        raise DefinitionError(f"{where}: expect body maps a JSON Pointer or JSONPath to a value")
    for path in body:
        if not isinstance(path, str) or not path.startswith(("/", "$")):
            raise DefinitionError(
                f"{where}: expect body key {path!r} is not a JSON Pointer or JSONPath"
            )
    return Expect(status=tuple(statuses), body=body)


def _conditions(raw: object, where: str) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    conditions = []
    for item in items:
        if not isinstance(item, dict):
            raise DefinitionError(f"{where}: each condition must be a mapping")
        for field in ("step", "key_path", "expected_value"):
            if field not in item:
                raise DefinitionError(f"{where}: condition missing required field {field!r}")
        conditions.append(
            Condition(str(item["step"]), str(item["key_path"]), str(item["expected_value"]))
        )
    return tuple(conditions)


def _polling(raw: object, where: str) -> Polling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DefinitionError(f"{where}: polling must be a mapping")
    if "interval" not in raw:
        raise DefinitionError(f"{where}: polling missing required field 'interval'")
    key_path = raw.get("key_path")
    expected = raw.get("expected_values")
    if key_path is not None and expected is None:
        raise DefinitionError(f"{where}: polling with 'key_path' requires 'expected_values'")
    values = [] if expected is None else expected if isinstance(expected, list) else [expected]
    return Polling(
        interval=_number(raw["interval"], f"{where}: polling interval"),
        max_timeout=_number(raw.get("max_timeout", 120), f"{where}: polling max_timeout"),
        key_path=None if key_path is None else str(key_path),
        expected_values=tuple(str(v) for v in values),
    )


def _retry(entry: Mapping[str, Any], where: str) -> Retry | None:
    if "retry" not in entry or entry["retry"] is None:
        return None
    raw = entry["retry"]
    if raw is False:
        return Retry(max_attempts=1)
    if raw is True:
        return Retry()
    if not isinstance(raw, dict):
        raise DefinitionError(f"{where}: retry is false or {{max_attempts, delay, retry_on}}")
    unknown = sorted(set(raw) - {"max_attempts", "delay", "retry_on", "on"})
    if unknown:
        raise DefinitionError(f"{where}: retry: unknown key(s) {unknown}")
    on = raw.get("on", raw.get("retry_on", ["timeout", "connection", "5xx"]))
    if not isinstance(on, list):
        raise DefinitionError(f"{where}: retry_on must be a list")
    attempts = raw.get("max_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise DefinitionError(f"{where}: retry max_attempts must be an integer")
    delay = raw.get("delay")
    return Retry(
        max_attempts=attempts,
        delay=None if delay is None else _number(delay, f"{where}: retry delay"),
        on=tuple(cast(list[str], [str(v) for v in on])),
    )
