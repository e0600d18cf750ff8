"""The HTTP side of a step: its request (references rendered, the key set, the client's policy)
and the judgement of its answer (expectations, captures, polling), with error texts that name
the step, the request (redacted headers) and the response (status, the problem's title and
detail)."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonpath

from ..client import RetryPolicy
from ._model import Capture, DefinitionError, Step
from ._refs import SENSITIVE_HEADERS, Scope, Secrets, render

__all__ = [
    "build_request",
    "chain_key",
    "describe_request",
    "dotted",
    "json_body",
    "judge",
    "poll_done",
    "polling_timed_out",
]

_KEYS = uuid.UUID("6f1c1e1a-0c5e-4f3e-9b7a-2a1d0c0ce1e5")  # the namespace of chain keys
_HIDDEN_HEADERS = frozenset(
    {"content-length", "host", "accept", "accept-encoding", "connection", "user-agent"}
)


def chain_key(run_id: str, step: str, iteration: int | None = None) -> str:
    """The Idempotency-Key of a step in a run (and iteration): the same every time."""
    name = f"{run_id}/{step}" if iteration is None else f"{run_id}/{step}/{iteration}"
    return str(uuid.uuid5(_KEYS, name))


def dotted(data: Any, path: str) -> Any:
    """api-chain-runner's key path: dict keys and list indexes (negative too); None if absent."""
    current = data
    for key in path.split("."):
        if isinstance(current, dict) and key in current:
            current = current[key]
        elif isinstance(current, list) and re.fullmatch(r"-?\d+", key):
            index = int(key)
            if not -len(current) <= index < len(current):
                return None
            current = current[index]
        else:
            return None
    return current


def build_request(
    step: Step,
    scope: Scope,
    *,
    run_id: str,
    iteration: int | None,
    policy: RetryPolicy | None,
    timeout: float,
    base: Path,
) -> tuple[httpx.Request, str | None]:
    """The request of a step (references rendered), and the key it carries."""
    name = step.name
    url = render(step.url, scope, name)
    if not isinstance(url, str):
        raise DefinitionError(f"step {name!r}: the url renders to {url!r}, not a string")
    headers: dict[str, str] = {}
    for header, value in render(dict(step.headers), scope, name).items():
        text = value if isinstance(value, str) else json.dumps(value)
        headers[header] = text
        if header.lower() in SENSITIVE_HEADERS:
            # "Bearer abc": the whole value and the credential alone are secrets.
            scope.secrets.add(text)
            scope.secrets.add(text.partition(" ")[2].strip())
    key: str | None = None
    extensions: dict[str, Any] = {}
    oncely: dict[str, Any] = {}
    if step.unsafe:
        if not step.idempotent:
            oncely["key"] = False
        else:
            given = None if step.key is None else render(step.key, scope, name)
            key = str(given) if given is not None else chain_key(run_id, name, iteration)
            headers = {k: v for k, v in headers.items() if k.lower() != "idempotency-key"}
            headers["Idempotency-Key"] = key
    chosen = _policy(step, policy)
    if chosen is not None:
        oncely["policy"] = chosen
    if oncely:
        extensions["oncely"] = oncely
    timeout = step.timeout or timeout
    extensions["timeout"] = httpx.Timeout(timeout).as_dict()
    content: dict[str, Any] = {}
    if step.files:
        boundary = hashlib.sha256(f"{run_id}/{name}/{iteration}".encode()).hexdigest()[:32]
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        content["files"] = _files(step, scope, base)
    elif step.payload is not None:
        content["json"] = render(step.payload, scope, name)
    try:
        request = httpx.Request(step.method, url, headers=headers, extensions=extensions, **content)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError, TypeError) as exc:
        raise DefinitionError(
            f"step {name!r}: cannot build the request to {scope.secrets.redact_text(url)!r}: {exc}"
        ) from exc
    return request, key


def _files(step: Step, scope: Scope, base: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for field_name, paths in render(dict(step.files), scope, step.name).items():
        for value in paths if isinstance(paths, list) else [paths]:
            path = (base / str(value)).resolve()
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DefinitionError(
                    f"step {step.name!r}: files.{field_name}: cannot read {str(path)!r}: "
                    f"{exc.strerror}"
                ) from exc
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files.append((field_name, (path.name, data, mime)))
    return files


def _policy(step: Step, default: RetryPolicy | None) -> RetryPolicy | None:
    """api-chain-runner's ``retry`` as the client's policy: max_attempts, delay as the
    backoff base, no 5xx retries without "5xx" in retry_on."""
    if step.retry is None:
        return default
    options: dict[str, Any] = {"attempts": step.retry.max_attempts}
    if step.retry.delay is not None:
        options["base"] = step.retry.delay
        options["throttled_base"] = max(step.retry.delay, 1.0)
    if "5xx" not in step.retry.on:
        options["statuses"] = frozenset({408, 409, 425, 429})
    return RetryPolicy(**options)


def json_body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def describe_request(request: httpx.Request, secrets: Secrets) -> str:
    """``METHOD URL [headers]``, redacted."""
    shown = secrets.headers(
        {k: v for k, v in request.headers.items() if k.lower() not in _HIDDEN_HEADERS}
    )
    listed = ", ".join(f"{k}: {v}" for k, v in shown.items())
    return f"{request.method} {secrets.redact_text(str(request.url))} [{listed}]"


def _describe_response(response: httpx.Response, body: Any) -> str:
    text = f"{response.status_code} {response.reason_phrase}".strip()
    if isinstance(body, dict) and ("title" in body or "detail" in body):
        title = body.get("title", "")
        detail = body.get("detail", "")
        text += f": {title}" + (f" ({detail})" if detail else "")
    return text


def judge(
    step: Step,
    scope: Scope,
    request: httpx.Request,
    response: httpx.Response,
    body: Any,
) -> tuple[str | None, dict[str, Any]]:
    """Why the step failed (None if it passed), and its captures."""
    secrets = scope.secrets

    def failed(why: str) -> str:
        return (
            f"step {step.name!r}: {why}; request {describe_request(request, secrets)}; "
            f"response {_describe_response(response, body)}"
        )

    status = response.status_code
    expected = step.expect.status
    if expected and status not in expected:
        return failed(f"expected status {' or '.join(map(str, expected))}, got {status}"), {}
    if not expected and not 200 <= status < 300:
        return failed(f"expected a 2xx status, got {status}"), {}
    for path, want in step.expect.body.items():
        wanted = render(want, scope, step.name)
        found, actual = _select(path, body)
        if not found or actual != wanted:
            shown = "nothing" if not found else json.dumps(actual)
            return failed(f"expected {json.dumps(wanted)} at {path}, got {shown}"), {}
    captures: dict[str, Any] = {}
    for capture in step.capture:
        ok, value = _capture(capture, response, body)
        if not ok:
            return failed(f"capture {capture.name!r}: nothing at {_capture_text(capture)}"), {}
        captures[capture.name] = value
    return None, captures


def _capture_text(capture: Capture) -> str:
    return capture.kind if capture.kind == "status" else f"{capture.kind} {capture.expr!r}"


def _select(path: str, body: Any) -> tuple[bool, Any]:
    """The value at a JSON Pointer (``/a/0``) or JSONPath (``$.a[0]``, first match)."""
    if path.startswith("$"):
        try:
            matches = jsonpath.findall(path, body)
        except jsonpath.JSONPathError:
            return False, None
        return (True, matches[0]) if matches else (False, None)
    try:
        return True, jsonpath.JSONPointer(path).resolve(body)
    except (jsonpath.JSONPointerError, TypeError):
        return False, None


def _capture(capture: Capture, response: httpx.Response, body: Any) -> tuple[bool, Any]:
    if capture.kind == "status":
        return True, response.status_code
    if capture.kind == "header":
        value = response.headers.get(capture.expr)
        return value is not None, value
    if capture.kind == "regex":
        found = re.search(capture.expr, response.text)
        if found is None:
            return False, None
        return True, found.group(1) if found.groups() else found.group(0)
    if body is None:
        return False, None
    return _select(capture.expr or "", body)


def poll_done(step: Step, response: httpx.Response) -> bool:
    polling = step.polling
    assert polling is not None
    if not 200 <= response.status_code < 300:
        return False
    if polling.key_path is None:
        return True
    actual = dotted(json_body(response), polling.key_path)
    return str(actual) in polling.expected_values


def polling_timed_out(step: Step, response: httpx.Response, body: Any) -> str:
    polling = step.polling
    assert polling is not None
    if polling.key_path is None:
        return (
            f"polling timed out after {polling.max_timeout:g}s: last status {response.status_code}"
        )
    actual = dotted(body, polling.key_path)
    return (
        f"polling timed out after {polling.max_timeout:g}s: {polling.key_path} is {actual!r}, "
        f"expected one of {list(polling.expected_values)}"
    )
