"""References (``${...}``) and secrets.

- ``${step.path}``: an earlier step's JSON response, by dict keys and list indexes
  (``${create_order.items.0.sku}``); ``${step.capture}``: one of its captures (a capture's name
  wins over a body key of the same name). ``${vars.k}``, ``${inputs.k}``, ``${ENV:NAME}``
  (the environment and ``.env`` files), ``${each.value}`` / ``${each.index}`` in a ``for_each``.
- A string that is one whole reference takes the value's JSON type; a reference inside a string
  is rendered into it (JSON text for objects, lists, booleans and null).
- :func:`check_references` finds every unknown reference before anything is sent.

Secrets (``${ENV:...}`` values, secret inputs and captures, Authorization and cookie headers)
are collected in :class:`Secrets`, which redacts them from anything shown or stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._model import Chain, DefinitionError, Step

__all__ = [
    "REDACTED",
    "SENSITIVE_HEADERS",
    "Scope",
    "Secrets",
    "StepData",
    "UnknownReference",
    "check_references",
    "references",
    "render",
]

REDACTED = "[redacted]"
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
_REFERENCE = re.compile(r"\$\{([^}]+)\}")
_MISSING = object()
# Shorter values are too common to redact by value (they are still redacted by header name).
_MIN_SECRET = 3


class UnknownReference(DefinitionError):
    """A ``${...}`` that names nothing: the message names the step and the reference."""

    def __init__(self, step: str, reference: str, why: str) -> None:
        super().__init__(f"step {step!r}: unknown reference ${{{reference}}}: {why}")
        self.step, self.reference = step, reference


@dataclass
class Secrets:
    """Secret values seen so far; :meth:`redact` replaces each one wherever it appears."""

    values: set[str] = field(default_factory=set)

    def add(self, value: object) -> None:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            text = str(value)
            if len(text) >= _MIN_SECRET:
                self.values.add(text)

    def redact_text(self, text: str) -> str:
        for secret in sorted(self.values, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def redact(self, value: Any) -> Any:
        """``value`` (JSON-like) with every secret replaced; whether anything was replaced is
        :meth:`holds`'s question."""
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, Mapping):
            return {str(k): self.redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact(v) for v in value]
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and str(value) in self.values
        ):
            return REDACTED
        return value

    def holds(self, value: Any) -> bool:
        """Whether ``value`` contains a secret."""
        return bool(self.redact(value) != value)

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {
            name: REDACTED if name.lower() in SENSITIVE_HEADERS else self.redact_text(value)
            for name, value in headers.items()
        }


@dataclass
class StepData:
    """What later steps can reference: the JSON body (or None) and the captures."""

    body: Any
    captures: dict[str, Any]


@dataclass
class Scope:
    """Everything a reference can name at one point of a run."""

    variables: Mapping[str, Any]
    inputs: Mapping[str, Any]
    env: Mapping[str, str]
    steps: dict[str, StepData]
    secrets: Secrets
    each: Mapping[str, Any] | None = None


def references(template: Any) -> Iterator[str]:
    """Every reference in a template (dicts, lists and strings, keys included)."""
    if isinstance(template, str):
        yield from _REFERENCE.findall(template)
    elif isinstance(template, Mapping):
        for key, value in template.items():
            yield from references(key)
            yield from references(value)
    elif isinstance(template, list | tuple):
        for item in template:
            yield from references(item)


def _templates(step: Step) -> Iterator[Any]:
    yield step.url
    yield dict(step.headers)
    yield step.payload
    yield dict(step.files)
    yield step.key
    yield step.for_each
    yield dict(step.expect.body)


def check_references(chain: Chain, inputs: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Raise :class:`UnknownReference` for the first reference that names nothing."""
    earlier: dict[str, Step] = {}
    for step in chain.steps:
        for template in _templates(step):
            for reference in references(template):
                _check(reference, step, earlier, chain, inputs, env)
        earlier[step.name] = step
    for name, value in chain.variables.items():
        for reference in references(value):
            if not reference.startswith("ENV:"):
                raise UnknownReference(
                    f"vars.{name}", reference, "variables may reference only ${ENV:NAME}"
                )
            _check_env(reference, f"vars.{name}", env)


def _check_env(reference: str, where: str, env: Mapping[str, str]) -> None:
    name = reference[4:]
    if name not in env:
        raise UnknownReference(
            where, reference, f"environment variable {name} is not set (nor in an .env file)"
        )


def _check(
    reference: str,
    step: Step,
    earlier: Mapping[str, Step],
    chain: Chain,
    inputs: Mapping[str, Any],
    env: Mapping[str, str],
) -> None:
    if reference.startswith("ENV:"):
        _check_env(reference, step.name, env)
        return
    head, _, path = reference.partition(".")
    if not path:
        raise UnknownReference(step.name, reference, "write ${step.path}, ${vars.k} or ${inputs.k}")
    first = path.split(".", 1)[0]
    if head == "vars":
        if first not in chain.variables:
            raise UnknownReference(step.name, reference, f"no variable {first!r}")
    elif head == "inputs":
        if first not in chain.inputs and first not in inputs:
            raise UnknownReference(step.name, reference, f"no input {first!r} is declared")
    elif head == "each":
        if step.for_each is None:
            raise UnknownReference(step.name, reference, "${each...} is for steps with for_each")
        if first not in ("value", "index"):
            raise UnknownReference(step.name, reference, "write ${each.value} or ${each.index}")
    elif head == step.name:
        raise UnknownReference(step.name, reference, "a step cannot reference its own response")
    elif head not in earlier:
        later = any(s.name == head for s in chain.steps)
        why = "that step comes later" if later else "no earlier step, variable or input is named so"
        raise UnknownReference(step.name, reference, why)


def _walk(value: Any, path: list[str]) -> Any:
    for segment in path:
        if isinstance(value, Mapping) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", segment):
            index = int(segment)
            if not -len(value) <= index < len(value):
                return _MISSING
            value = value[index]
        else:
            return _MISSING
    return value


def lookup(reference: str, scope: Scope, step: str) -> Any:
    """The value a reference names now; :class:`UnknownReference` if it names nothing."""
    if reference.startswith("ENV:"):
        name = reference[4:]
        if name not in scope.env:
            raise UnknownReference(step, reference, f"environment variable {name} is not set")
        value: Any = scope.env[name]
        scope.secrets.add(value)
        return value
    head, _, rest = reference.partition(".")
    path = rest.split(".") if rest else []
    if head == "vars":
        value = _walk(render(dict(scope.variables), scope, step), path)
    elif head == "inputs":
        value = _walk(scope.inputs, path)
    elif head == "each":
        value = _MISSING if scope.each is None else _walk(scope.each, path)
    elif head in scope.steps:
        data = scope.steps[head]
        if path and path[0] in data.captures:
            value = _walk(data.captures[path[0]], path[1:])
        else:
            value = _walk(data.body, path)
    else:
        raise UnknownReference(step, reference, "no earlier step, variable or input is named so")
    if value is _MISSING:
        raise UnknownReference(step, reference, f"{head}'s value has nothing at {rest!r}")
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(template: Any, scope: Scope, step: str) -> Any:
    """``template`` with its references replaced (see the module docstring)."""
    if isinstance(template, str):
        whole = _REFERENCE.fullmatch(template)
        if whole is not None:
            return lookup(whole.group(1), scope, step)
        return _REFERENCE.sub(lambda m: _text(lookup(m.group(1), scope, step)), template)
    if isinstance(template, Mapping):
        return {
            str(render(key, scope, step)): render(value, scope, step)
            for key, value in template.items()
        }
    if isinstance(template, list | tuple):
        return [render(item, scope, step) for item in template]
    return template
