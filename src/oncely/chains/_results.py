"""What a run tells its caller: a typed result per step, the run's result, progress events,
and the exit codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._model import ChainError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TRANSPORT",
    "EXIT_USAGE",
    "Event",
    "ResumeRefused",
    "RunResult",
    "StepFinished",
    "StepResult",
    "StepStarted",
    "StepState",
]

# 0 all passed; 1 a step failed; 2 bad definition or usage; 3 transport failure after the
# client's retries; 4 resume refused (changed inputs or definition).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TRANSPORT, EXIT_REFUSED = 0, 1, 2, 3, 4
StepState = Literal["ran", "replayed", "skipped", "failed"]


class ResumeRefused(ChainError):
    """The run id names a run of another chain definition or with other inputs."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step (one iteration of a ``for_each``): what happened, as shown and reported.

    ``state``: ran, replayed (the server answered with its stored response), skipped or
    failed. ``journal``: taken from the journal of an earlier process, not sent now.
    Everything here is redacted.
    """

    name: str
    state: StepState
    method: str
    url: str
    iteration: int | None = None
    status: int | None = None
    attempts: int = 0
    replayed: bool = False
    elapsed: float = 0.0
    journal: bool = False
    captures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    transport_error: bool = False

    @property
    def label(self) -> str:
        return self.name if self.iteration is None else f"{self.name}[{self.iteration}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "iteration": self.iteration,
            "state": self.state,
            "method": self.method,
            "url": self.url,
            "status": self.status,
            "attempts": self.attempts,
            "replayed": self.replayed,
            "elapsed": self.elapsed,
            "journal": self.journal,
            "captures": self.captures,
            "error": self.error,
            "transport_error": self.transport_error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepResult:
        return cls(**dict(data))


@dataclass(frozen=True, slots=True)
class RunResult:
    """A whole run: its id, every step's result, the exit code (0, 1 or 3)."""

    run_id: str
    chain: str
    steps: tuple[StepResult, ...]
    exit_code: int
    resumed: bool = False
    started: float = 0.0
    elapsed: float = 0.0

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "chain": self.chain,
            "exit_code": self.exit_code,
            "passed": self.passed,
            "resumed": self.resumed,
            "started": self.started,
            "elapsed": self.elapsed,
            "steps": [step.to_json() for step in self.steps],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        return cls(
            run_id=data["run_id"],
            chain=data["chain"],
            steps=tuple(StepResult.from_json(s) for s in data["steps"]),
            exit_code=data["exit_code"],
            resumed=data["resumed"],
            started=data["started"],
            elapsed=data["elapsed"],
        )


@dataclass(frozen=True, slots=True)
class StepStarted:
    name: str
    iteration: int | None
    index: int
    total: int


@dataclass(frozen=True, slots=True)
class StepFinished:
    result: StepResult
    index: int
    total: int
    printed: tuple[str, ...] = ()


Event = StepStarted | StepFinished
