"""The chain model: a :class:`Chain` of :class:`Step` objects, as YAML describes them or as code
builds them.

    Chain(
        variables={"base": "http://127.0.0.1:8000"},
        inputs={"customer": Input(required=True)},
        steps=[
            Step("create_order", "${vars.base}/orders", "POST", payload={...},
                 expect=Expect(status=(201,)), capture=(Capture("order_id", "pointer", "/id"),)),
            Step("pay", "${vars.base}/orders/${create_order.order_id}/pay", "POST"),
        ],
    )

Everything is frozen and checked when built: a bad field is a :class:`DefinitionError` naming
the step and the field. The definition's :meth:`Chain.fingerprint` is what a run is bound to.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._errors import OncelyError

__all__ = [
    "METHODS",
    "RESERVED_NAMES",
    "UNSAFE_METHODS",
    "Capture",
    "Chain",
    "ChainError",
    "Condition",
    "DefinitionError",
    "Expect",
    "Input",
    "Polling",
    "Retry",
    "Step",
]

METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"})
# The methods a chain sends with an Idempotency-Key (RFC 9110: the others are idempotent).
UNSAFE_METHODS = frozenset({"POST", "PATCH"})
# Reference namespaces; no step may take one of these names.
RESERVED_NAMES = frozenset({"vars", "inputs", "ENV", "each"})
RETRY_ON = frozenset({"timeout", "connection", "5xx"})
CaptureKind = Literal["pointer", "jsonpath", "regex", "header", "status"]
InputType = Literal["string", "integer", "number", "boolean", "json"]
INPUT_TYPES: tuple[InputType, ...] = ("string", "integer", "number", "boolean", "json")
_NOT_JSON = object()


class ChainError(OncelyError):
    """The root of the errors of chains."""


class DefinitionError(ChainError, ValueError):
    """The chain is not valid: a missing or unknown field, a bad value, an unknown reference."""


def _fail(step: str | None, message: str) -> DefinitionError:
    return DefinitionError(f"step {step!r}: {message}" if step else message)


@dataclass(frozen=True, slots=True)
class Capture:
    """A value kept from a step's response, referenced later as ``${step.name}``.

    ``kind``: ``pointer`` (RFC 6901, ``/items/0/id``), ``jsonpath`` (RFC 9535, ``$.items[0].id``;
    the first match), ``regex`` (over the body text; group 1 if the pattern has one), ``header``
    (the header's value) or ``status`` (the status code). ``secret``: redacted wherever shown.
    """

    name: str
    kind: CaptureKind
    expr: str = ""
    secret: bool = False


@dataclass(frozen=True, slots=True)
class Expect:
    """Assertions on the final answer: ``status`` (any of; default: 2xx) and ``body`` values at
    JSON Pointers or JSONPaths (references allowed in the expected values)."""

    status: tuple[int, ...] = ()
    body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Condition:
    """Run the step only if ``step``'s response has ``expected_value`` at ``key_path``
    (api-chain-runner's dotted path, compared as text)."""

    step: str
    key_path: str
    expected_value: str


@dataclass(frozen=True, slots=True)
class Polling:
    """Repeat a safe step every ``interval`` s until ``key_path`` holds one of
    ``expected_values`` (or, without them, until a 2xx), for at most ``max_timeout`` s."""

    interval: float
    max_timeout: float = 120.0
    key_path: str | None = None
    expected_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Retry:
    """The step's retry policy, for oncely's client: ``max_attempts`` in all (1: no retry),
    ``delay`` the backoff base in seconds (None: the client's), ``on`` which failures retry."""

    max_attempts: int = 3
    delay: float | None = None
    on: tuple[str, ...] = ("timeout", "connection", "5xx")


@dataclass(frozen=True, slots=True)
class Input:
    """A declared input, given with ``--input name=value``.

    ``type``: how a value given as text (on the command line) is read: ``string`` (as it is),
    ``integer``, ``number``, ``boolean`` (true/false) or ``json`` (any JSON value).
    """

    required: bool = False
    secret: bool = False
    default: Any = None
    type: InputType = "string"

    def __post_init__(self) -> None:
        if self.type not in INPUT_TYPES:
            raise DefinitionError(f"input type {self.type!r} is not one of {list(INPUT_TYPES)}")

    def read(self, name: str, value: Any) -> Any:
        """``value`` as this input's type (text is converted; other values pass as they are)."""
        if not isinstance(value, str) or self.type == "string":
            return value
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = _NOT_JSON
        ok = {
            "integer": isinstance(parsed, int) and not isinstance(parsed, bool),
            "number": isinstance(parsed, int | float) and not isinstance(parsed, bool),
            "boolean": isinstance(parsed, bool),
            "json": parsed is not _NOT_JSON,
        }[self.type]
        if not ok:
            raise DefinitionError(f"input {name!r} must be of type {self.type}, not {value!r}")
        return parsed


@dataclass(frozen=True, slots=True)
class Step:
    """One HTTP call. Templates (``url``, ``headers``, ``payload``, ``key``) may hold references.

    ``key``: the Idempotency-Key to send (a template) instead of the derived one; ``idempotent``
    False sends an unsafe step without a key (and so without retries). ``for_each``: a list, or
    a reference to one: the step is sent once per item (``${each.value}``, ``${each.index}``).
    """

    name: str
    url: str
    method: str = "GET"
    headers: Mapping[str, Any] = field(default_factory=dict)
    payload: Any = None
    files: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    capture: tuple[Capture, ...] = ()
    expect: Expect = field(default_factory=Expect)
    condition: tuple[Condition, ...] = ()
    polling: Polling | None = None
    retry: Retry | None = None
    delay: float = 0.0
    continue_on_error: bool = False
    key: str | None = None
    idempotent: bool = True
    for_each: Any = None
    print_keys: tuple[str, ...] = ()
    timeout: float | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name.strip():
            raise _fail(None, "every step needs a name (a non-empty string)")
        if name in RESERVED_NAMES or "." in name or "}" in name or ":" in name:
            raise _fail(
                name,
                f"a step name may not contain '.', ':' or '}}', nor be {sorted(RESERVED_NAMES)}",
            )
        if not isinstance(self.url, str) or not self.url.strip():
            raise _fail(name, "url must be a non-empty string")
        method = self.method.upper() if isinstance(self.method, str) else ""
        if method not in METHODS:
            raise _fail(name, f"method {self.method!r} is not one of {sorted(METHODS)}")
        object.__setattr__(self, "method", method)
        if self.payload is not None and self.files:
            raise _fail(name, "send either payload or files, not both")
        if self.polling is not None:
            if self.unsafe:
                raise _fail(
                    name,
                    f"polling repeats a request; a {method} is not repeated (poll a GET instead)",
                )
            if self.polling.interval <= 0 or self.polling.max_timeout <= 0:
                raise _fail(name, "polling interval and max_timeout must be positive")
        if self.retry is not None:
            if self.retry.max_attempts < 1:
                raise _fail(name, "retry max_attempts must be at least 1")
            if self.retry.delay is not None and self.retry.delay < 0:
                raise _fail(name, "retry delay must not be negative")
            unknown = set(self.retry.on) - RETRY_ON
            if unknown:
                raise _fail(
                    name,
                    f"retry on {sorted(unknown)} is not supported: oncely's client retries "
                    f"{sorted(RETRY_ON)} (and 408, 409 in flight, 425, 429); other 4xx answers "
                    "are final",
                )
        if self.delay < 0:
            raise _fail(name, "delay must not be negative")
        if self.timeout is not None and self.timeout <= 0:
            raise _fail(name, "timeout must be positive")
        if self.key is not None and not self.idempotent:
            raise _fail(name, "a step with its own key cannot also opt out of keys")
        seen: set[str] = set()
        for capture in self.capture:
            if capture.name in seen:
                raise _fail(name, f"capture {capture.name!r} is defined twice")
            seen.add(capture.name)
            _check_capture(name, capture)

    @property
    def unsafe(self) -> bool:
        """Whether the step is sent with an Idempotency-Key (POST, PATCH)."""
        return self.method in UNSAFE_METHODS


def _check_capture(step: str, capture: Capture) -> None:
    if not capture.name or "." in capture.name:
        raise _fail(step, f"capture name {capture.name!r} must be non-empty, without '.'")
    if capture.kind == "pointer" and capture.expr and not capture.expr.startswith("/"):
        raise _fail(step, f"capture {capture.name!r}: a JSON Pointer starts with '/'")
    if capture.kind == "jsonpath" and not capture.expr.startswith("$"):
        raise _fail(step, f"capture {capture.name!r}: a JSONPath starts with '$'")
    if capture.kind == "regex":
        try:
            re.compile(capture.expr)
        except re.error as exc:
            raise _fail(step, f"capture {capture.name!r}: bad regex: {exc}") from exc
    if capture.kind == "header" and not capture.expr:
        raise _fail(step, f"capture {capture.name!r}: name the header")


@dataclass(frozen=True, slots=True)
class Chain:
    """Steps run in order; ``variables`` are ``${vars.k}``, ``inputs`` are ``${inputs.k}``."""

    steps: Sequence[Step]
    variables: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Input] = field(default_factory=dict)
    name: str = "chain"
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise DefinitionError("a chain needs at least one step")
        seen: set[str] = set()
        for step in self.steps:
            if step.name in seen:
                raise _fail(step.name, "step names must be unique; this one is used twice")
            for condition in step.condition:
                if condition.step not in seen:
                    raise _fail(
                        step.name, f"condition names step {condition.step!r}, not an earlier step"
                    )
            seen.add(step.name)

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def definition(self) -> dict[str, Any]:
        """The definition as plain JSON values (what the fingerprint covers)."""
        return {
            "name": self.name,
            "variables": _plain(self.variables),
            "inputs": {k: asdict(v) for k, v in sorted(self.inputs.items())},
            "steps": [_plain(asdict(step)) for step in self.steps],
        }

    def fingerprint(self) -> str:
        """sha256 over the canonical definition: a changed chain has another fingerprint."""
        text = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"), default=str)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
