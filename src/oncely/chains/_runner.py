"""Running a chain: once, and again after a crash, without repeating an effect.

Theory of operation. :func:`_flow` is a generator over the whole run that yields what needs
I/O -- :class:`Send` a request (through oncely's client), :class:`Sleep` -- and receives the
answer (or the exception) back. :func:`run_chain` drives it with ``httpx.Client`` over
:class:`~oncely.client.IdempotentTransport`, :func:`arun_chain` with the async twins; every
decision is made once, here. The journal (SQLite, synchronous) is written from the flow.

One step, in a run or a resumed run::

    journal says ran/replayed (nothing redacted) ─> its captures and body, nothing sent
    condition not met ───────────────────────────> skipped
    render the request (unknown reference: error, nothing sent)
    unsafe (POST, PATCH): intent + key, on disk ─> send with Idempotency-Key (the client
        retries with that key) ─> crash here? resume sends again with the same key and the
        server replays ("replayed") or runs it once
    expectations, captures ─> result on disk ─> next step (a failure stops the chain unless
        continue_on_error)

The key is ``uuid5(run id, step, iteration)``: the same on every retry and every re-run of the
run. A run is bound to its definition and inputs (fingerprints): another chain or other inputs
under the same run id are refused (:class:`ResumeRefused`) before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets as _secrets
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from dotenv import dotenv_values

from ..client import (
    AsyncIdempotentTransport,
    IdempotentTransport,
    KeyReusedError,
    RetryLater,
    RetryPolicy,
)
from ._http import (
    build_request,
    describe_request,
    dotted,
    json_body,
    judge,
    poll_done,
    polling_timed_out,
)
from ._journal import DEFAULT_JOURNAL, Journal, StepRecord
from ._model import Chain, DefinitionError, Step
from ._refs import Scope, Secrets, StepData, check_references, references, render
from ._results import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TRANSPORT,
    EXIT_USAGE,
    Event,
    ResumeRefused,
    RunResult,
    StepFinished,
    StepResult,
    StepStarted,
    StepState,
)

__all__ = ["HOOK_POINTS", "arun_chain", "load_env", "run_chain"]

# The names of the points where a hook is called (tests stop the process there).
HOOK_POINTS = ("before_step", "after_intent", "after_send", "after_step")
# Bodies up to this size are kept in the journal (redacted); a larger one is sent again on resume.
MAX_KEPT_BODY = 2**20


# What the flow asks its driver to do. -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Flow = Generator[Send | Sleep, Any, RunResult]


def load_env(chain: Chain, env_file: str | Path | None = None) -> dict[str, str]:
    """The environment for ``${ENV:...}``: ``.env`` files beside the chain, its parent folder,
    the working directory, then ``env_file``; the process environment wins over all of them."""
    merged: dict[str, str] = {}
    files: list[Path] = []
    if chain.source is not None:
        files += [chain.source.parent / ".env", chain.source.parent.parent / ".env"]
    files.append(Path(".env"))
    for path in files:
        if path.is_file():
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise DefinitionError(f"env file {str(path)!r} does not exist")
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ)
    return merged


def _digest(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _inputs(chain: Chain, given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(chain.inputs))
    if unknown:
        declared = sorted(chain.inputs) or "none"
        raise DefinitionError(f"unknown input(s) {unknown}; the chain declares: {declared}")
    values: dict[str, Any] = {}
    for name, spec in chain.inputs.items():
        if name in given:
            values[name] = spec.read(name, given[name])
        elif spec.default is not None:
            values[name] = spec.default
        elif spec.required:
            raise DefinitionError(f"input {name!r} is required: give --input {name}=VALUE")
    return values


@dataclass
class _Run:
    """The state of one run while the flow goes."""

    chain: Chain
    run_id: str
    journal: Journal
    scope: Scope
    hook: Callable[[str, str], None] | None
    clock: Callable[[], float]
    on_event: Callable[[Event], None] | None
    policy: RetryPolicy | None
    timeout: float
    results: list[StepResult] = field(default_factory=list)

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def point(self, name: str, step: str) -> None:
        if self.hook is not None:
            self.hook(name, step)


def _prepare(
    chain: Chain,
    inputs: Mapping[str, Any] | None,
    run_id: str | None,
    journal: Journal,
    env: Mapping[str, str] | None,
    env_file: str | Path | None,
) -> tuple[str, Scope, bool]:
    """Inputs, references, fingerprints and the run's journal entry; nothing is sent."""
    environment = dict(env) if env is not None else load_env(chain, env_file)
    existing = journal.run(run_id) if run_id is not None else None
    given = dict(inputs or {})
    if existing is not None:
        # A resume: the recorded inputs, except secret ones, which are given again.
        recorded = {k: v for k, v in existing.input_values.items() if v is not None}
        given = {**recorded, **given}
    values = _inputs(chain, given)
    secrets = Secrets()
    for template in (chain.variables, *[_all_templates(step) for step in chain.steps]):
        for reference in references(template):
            if reference.startswith("ENV:") and reference[4:] in environment:
                secrets.add(environment[reference[4:]])
    for name, spec in chain.inputs.items():
        if spec.secret and name in values:
            secrets.add(values[name])
    check_references(chain, values, environment)
    run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(3)}"
    definition = chain.fingerprint()
    inputs_digest = _digest(run_id, values)
    if existing is not None:
        if existing.definition != definition:
            raise ResumeRefused(
                f"run {run_id!r} was started with another chain definition "
                f"({existing.chain or existing.name}); it cannot continue with this one. "
                "Start a new run (another --run-id, or none)."
            )
        if existing.inputs != inputs_digest:
            changed = sorted(
                k
                for k in set(values) | set(existing.input_values)
                if existing.input_values.get(k) != values.get(k)
                and not chain.inputs.get(k, _NOT_SECRET).secret
            )
            named = f" ({', '.join(changed)})" if changed else " (a secret input)"
            raise ResumeRefused(
                f"run {run_id!r} was started with other inputs{named}; it cannot continue with "
                "these. Give the same inputs, or start a new run (another --run-id, or none)."
            )
    else:
        journal.create_run(
            run_id,
            chain=None if chain.source is None else str(chain.source),
            name=chain.name,
            definition=definition,
            inputs=inputs_digest,
            input_values={k: None if chain.inputs[k].secret else v for k, v in values.items()},
        )
    scope = Scope(chain.variables, values, environment, {}, secrets)
    return run_id, scope, existing is not None


class _NotSecret:
    secret = False


_NOT_SECRET: Any = _NotSecret()


def _all_templates(step: Step) -> list[Any]:
    return [step.url, dict(step.headers), step.payload, step.key, step.for_each, dict(step.files)]


# The flow ------------------------------------------------------------------------------


def _flow(run: _Run, resumed: bool) -> Flow:
    started = time.time()
    t0 = run.clock()
    total = len(run.chain.steps)
    stopped = False
    for index, step in enumerate(run.chain.steps):
        if stopped:
            break
        run.point("before_step", step.name)
        try:
            iterations = _iterations(run, step)
        except DefinitionError:
            run.journal.finish_run(run.run_id, "failed", EXIT_USAGE)
            raise
        for iteration in iterations:
            run.emit(StepStarted(step.name, iteration, index, total))
            try:
                result, printed = yield from _step(run, step, index, iteration)
            except DefinitionError as exc:
                # A reference the response does not have: nothing of this step was sent.
                number = 0 if iteration is None else iteration
                broken = StepResult(step.name, "failed", step.method, "", iteration, error=str(exc))
                _record(
                    run, step, index, number, broken, None, body=None, digest=None, redacted=False
                )
                run.journal.finish_run(run.run_id, "failed", EXIT_USAGE)
                raise
            run.results.append(result)
            run.emit(StepFinished(result, index, total, printed))
            run.point("after_step", step.name)
            if result.state == "failed" and not step.continue_on_error:
                stopped = True
                break
    failed = [r for r in run.results if r.state == "failed"]
    if any(r.transport_error for r in failed):
        code = EXIT_TRANSPORT
    elif failed:
        code = EXIT_FAILED
    else:
        code = EXIT_OK
    run.journal.finish_run(run.run_id, "passed" if code == EXIT_OK else "failed", code)
    return RunResult(
        run_id=run.run_id,
        chain=run.chain.name,
        steps=tuple(run.results),
        exit_code=code,
        resumed=resumed,
        started=started,
        elapsed=run.clock() - t0,
    )


def _iterations(run: _Run, step: Step) -> list[int | None]:
    if step.for_each is None:
        return [None]
    items = render(step.for_each, run.scope, step.name)
    if not isinstance(items, list):
        raise DefinitionError(f"step {step.name!r}: for_each must be a list, not {items!r}")
    return list(range(len(items)))


def _condition_met(run: _Run, step: Step) -> str | None:
    """None if the step runs; else why it is skipped."""
    for condition in step.condition:
        data = run.scope.steps.get(condition.step)
        if data is None:
            return f"step {condition.step!r} has no result"
        actual = dotted(data.body, condition.key_path)
        if str(actual) != condition.expected_value:
            return (
                f"condition not met: {condition.step}.{condition.key_path} is {actual!r}, "
                f"not {condition.expected_value!r}"
            )
    return None


def _remember(
    run: _Run, step: Step, iteration: int | None, body: Any, captures: dict[str, Any]
) -> None:
    if iteration is None:
        run.scope.steps[step.name] = StepData(body, captures)
        return
    data = run.scope.steps.setdefault(step.name, StepData([], {}))
    data.body.append(body)
    for name, value in captures.items():
        data.captures.setdefault(name, []).append(value)


def _from_journal(run: _Run, step: Step, iteration: int | None, record: StepRecord) -> StepResult:
    _remember(run, step, iteration, record.body, record.captures)
    for capture in step.capture:
        if capture.secret:
            run.scope.secrets.add(record.captures.get(capture.name))
    return StepResult(
        name=step.name,
        state="replayed" if record.state == "replayed" else "ran",
        method=record.method,
        url=record.url,
        iteration=iteration,
        status=record.status,
        attempts=record.attempts,
        replayed=record.replayed,
        elapsed=record.elapsed,
        journal=True,
        captures=run.scope.secrets.redact(record.captures),
    )


def _step(
    run: _Run, step: Step, index: int, iteration: int | None
) -> Generator[Send | Sleep, Any, tuple[StepResult, tuple[str, ...]]]:
    number = 0 if iteration is None else iteration
    record = run.journal.step(run.run_id, step.name, number)
    if record is not None and record.done:
        return _from_journal(run, step, iteration, record), ()
    secrets = run.scope.secrets
    skip = _condition_met(run, step)
    if skip is not None:
        result = StepResult(step.name, "skipped", step.method, "", iteration, error=skip)
        _record(run, step, index, number, result, None, body=None, digest=None, redacted=False)
        return result, ()
    scope = run.scope
    if iteration is not None:
        items = render(step.for_each, scope, step.name)
        scope = replace(scope, each={"value": items[iteration], "index": iteration})
    base = run.chain.source.parent if run.chain.source is not None else Path.cwd()
    request, key = build_request(
        step,
        scope,
        run_id=run.run_id,
        iteration=iteration,
        policy=run.policy,
        timeout=run.timeout,
        base=base,
    )
    shown_url = secrets.redact_text(str(request.url))
    if step.delay > 0:
        yield Sleep(step.delay)
    if step.unsafe:
        run.journal.intent(
            run.run_id, step.name, number, index, key=key, method=step.method, url=shown_url
        )
        run.point("after_intent", step.name)
    t0 = run.clock()
    attempts = 0
    while True:
        try:
            response: httpx.Response = yield Send(request)
        except (httpx.TransportError, RetryLater, KeyReusedError) as exc:
            # Transport failures (after the client's retries) exit 3; a key reused for another
            # request (the environment changed a body) is the step's own failure.
            transport = not isinstance(exc, KeyReusedError)
            error = f"step {step.name!r}: {describe_request(request, secrets)}: "
            error += f"{type(exc).__name__}: {exc}" if transport else str(exc)
            result = StepResult(
                step.name,
                "failed",
                step.method,
                shown_url,
                iteration,
                attempts=attempts + 1,
                elapsed=run.clock() - t0,
                error=secrets.redact_text(error),
                transport_error=transport,
            )
            _record(run, step, index, number, result, key, body=None, digest=None, redacted=False)
            return result, ()
        report = response.extensions.get("oncely") or {}
        attempts += int(report.get("attempts", 1))
        if step.polling is None:
            break
        verdict = poll_done(step, response)
        elapsed = run.clock() - t0
        if verdict or elapsed >= step.polling.max_timeout:
            break
        yield Sleep(min(step.polling.interval, step.polling.max_timeout - elapsed))
    run.point("after_send", step.name)
    replayed = (
        bool(report.get("replayed"))
        or response.headers.get("idempotent-replayed", "").lower() == "true"
    )
    body = json_body(response)
    failure, captures = judge(step, scope, request, response, body)
    if failure is None and step.polling is not None and not poll_done(step, response):
        failure = polling_timed_out(step, response, body)
    state: StepState = "failed" if failure else ("replayed" if replayed else "ran")
    for capture in step.capture:
        if capture.secret and capture.name in captures:
            secrets.add(captures[capture.name])
    kept_body = body if len(response.content) <= MAX_KEPT_BODY else None
    stored_captures = secrets.redact(captures)
    stored_body = secrets.redact(kept_body)
    redacted = (
        stored_captures != captures
        or stored_body != kept_body
        or (kept_body is None and body is not None)
    )
    result = StepResult(
        name=step.name,
        state=state,
        method=step.method,
        url=shown_url,
        iteration=iteration,
        status=response.status_code,
        attempts=attempts,
        replayed=replayed,
        elapsed=run.clock() - t0,
        captures=stored_captures,
        error=None if failure is None else secrets.redact_text(failure),
    )
    if state != "failed":
        _remember(run, step, iteration, body, captures)
    digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
    _record(
        run, step, index, number, result, key, body=stored_body, digest=digest, redacted=redacted
    )
    printed = tuple(
        secrets.redact_text(f"{path} = {dotted(body, path)}") for path in step.print_keys
    )
    return result, printed


def _record(
    run: _Run,
    step: Step,
    index: int,
    number: int,
    result: StepResult,
    key: str | None,
    *,
    body: Any,
    digest: str | None,
    redacted: bool,
) -> None:
    run.journal.result(
        run.run_id,
        step.name,
        number,
        index,
        state=result.state,
        key=key,
        method=result.method,
        url=result.url,
        status=result.status,
        attempts=result.attempts,
        replayed=result.replayed,
        elapsed=result.elapsed,
        captures=result.captures,
        body=body,
        digest=digest,
        redacted=redacted,
        error=result.error,
    )


# Drivers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _journal(journal: Journal | str | Path) -> Iterator[Journal]:
    """The journal given, or one opened (and closed) for this run."""
    if isinstance(journal, Journal):
        yield journal
        return
    with Journal(journal) as opened:
        yield opened


def _start(
    chain: Chain,
    inputs: Mapping[str, Any] | None,
    journal: Journal,
    *,
    run_id: str | None,
    env: Mapping[str, str] | None,
    env_file: str | Path | None,
    hook: Callable[[str, str], None] | None,
    clock: Callable[[], float],
    on_event: Callable[[Event], None] | None,
    policy: RetryPolicy | None,
    timeout: float,
) -> Flow:
    """The run's flow, once its inputs, references and journal entry are checked."""
    run_id, scope, resumed = _prepare(chain, inputs, run_id, journal, env, env_file)
    run = _Run(chain, run_id, journal, scope, hook, clock, on_event, policy, timeout)
    return _flow(run, resumed)


@dataclass
class _Stepper:
    """Moves a flow on: hands it the last answer (or exception), returns what it asks next,
    or the run's result when it is done."""

    flow: Flow
    value: Any = None
    error: Exception | None = None

    def next(self) -> Send | Sleep | RunResult:
        value, error = self.value, self.error
        self.value, self.error = None, None
        try:
            return self.flow.send(value) if error is None else self.flow.throw(error)
        except StopIteration as done:
            result: RunResult = done.value
            return result


def run_chain(
    chain: Chain,
    inputs: Mapping[str, Any] | None = None,
    *,
    run_id: str | None = None,
    journal: Journal | str | Path = DEFAULT_JOURNAL,
    transport: httpx.BaseTransport | None = None,
    client_options: Mapping[str, Any] | None = None,
    policy: RetryPolicy | None = None,
    env: Mapping[str, str] | None = None,
    env_file: str | Path | None = None,
    timeout: float = 30.0,
    on_event: Callable[[Event], None] | None = None,
    hook: Callable[[str, str], None] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """Run ``chain`` (or continue run ``run_id``) and return every step's result.

    Unsafe steps go through :class:`~oncely.client.IdempotentTransport` over ``transport``
    (default: httpx's own), with ``client_options`` (``budget``, ``sleep``, ...).
    Raises :class:`DefinitionError` (bad chain or inputs, unknown reference) and
    :class:`ResumeRefused` before anything is sent.
    """
    with _journal(journal) as book:
        flow = _start(
            chain,
            inputs,
            book,
            run_id=run_id,
            env=env,
            env_file=env_file,
            hook=hook,
            clock=clock,
            on_event=on_event,
            policy=policy,
            timeout=timeout,
        )
        wrapped = IdempotentTransport(transport, **dict(client_options or {}))
        with httpx.Client(transport=wrapped, timeout=timeout) as client:
            stepper = _Stepper(flow)
            while not isinstance(op := stepper.next(), RunResult):
                try:
                    if isinstance(op, Send):
                        response = client.send(op.request)
                        response.read()
                        response.close()
                        stepper.value = response
                    else:
                        sleep(op.seconds)
                except Exception as exc:
                    stepper.error = exc
            return op


async def arun_chain(
    chain: Chain,
    inputs: Mapping[str, Any] | None = None,
    *,
    run_id: str | None = None,
    journal: Journal | str | Path = DEFAULT_JOURNAL,
    transport: httpx.AsyncBaseTransport | None = None,
    client_options: Mapping[str, Any] | None = None,
    policy: RetryPolicy | None = None,
    env: Mapping[str, str] | None = None,
    env_file: str | Path | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - each request's timeout, handed to httpx
    on_event: Callable[[Event], None] | None = None,
    hook: Callable[[str, str], None] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """:func:`run_chain`'s async twin, over :class:`~oncely.client.AsyncIdempotentTransport`."""
    with _journal(journal) as book:
        flow = _start(
            chain,
            inputs,
            book,
            run_id=run_id,
            env=env,
            env_file=env_file,
            hook=hook,
            clock=clock,
            on_event=on_event,
            policy=policy,
            timeout=timeout,
        )
        wrapped = AsyncIdempotentTransport(transport, **dict(client_options or {}))
        async with httpx.AsyncClient(transport=wrapped, timeout=timeout) as client:
            stepper = _Stepper(flow)
            while not isinstance(op := stepper.next(), RunResult):
                try:
                    if isinstance(op, Send):
                        response = await client.send(op.request)
                        await response.aread()
                        await response.aclose()
                        stepper.value = response
                    else:
                        await sleep(op.seconds)
                except Exception as exc:
                    stepper.error = exc
            return op
