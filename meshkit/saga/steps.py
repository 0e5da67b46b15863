"""What a saga is made of: steps as (action, compensation) pairs over remote calls, and the
progress the orchestrator reads from the saga's recorded state.

An action gets the saga's current state and a StepContext, makes its call (with the
context's idempotency key and timeout), and returns the events that record the result; the
service's fold of those events is the new state. A business refusal that is not an error on
the wire (a declined payment) is an event too: the service's progress then says the saga
failed. A compensation undoes its step, and must be safe to run when the step's effect is
unknown or absent (a timed-out call may or may not have happened), since it also runs for the
step that failed; the events it returns are recorded with the saga's `compensated` ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message

from meshkit.saga.retry import StepRetry

State = TypeVar("State")


@dataclass(frozen=True, slots=True)
class StepContext:
    """One attempt of a step or compensation."""

    saga_id: str
    step: str
    attempt: int
    timeout: float
    """Seconds this attempt may take: the saga's remaining time, capped by the step's."""
    compensating: bool = False

    def idempotency_key(self, *parts: str) -> str:
        """The key for this step's call: the same on every attempt and after a crash, so the
        participant applies the step once. `parts` tell apart several calls of one step."""
        kind = "undo" if self.compensating else "do"
        return "/".join((self.saga_id, self.step, kind, *parts))


Action = Callable[[State, StepContext], Awaitable[Sequence[Message]]]


@dataclass(frozen=True, slots=True)
class Step(Generic[State]):
    """A named action, with the compensation that undoes it (None: nothing to undo)."""

    name: str
    action: Action[State]
    compensation: Action[State] | None = None
    retry: StepRetry = field(default_factory=StepRetry)
    timeout: float = 10.0
    """The most one attempt may take."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a saga is, as its recorded state says."""

    done: frozenset[str] = frozenset()
    """Steps whose results are recorded."""
    failure: str | None = None
    """Why the saga is undoing what it did; None while it goes forward."""
    failed_step: str | None = None
    """The step that failed (it is compensated too: its effect may have happened)."""
    compensated: frozenset[str] = frozenset()
    """Steps whose compensations are recorded."""
    ended: bool = False
    """Confirmed or aborted: nothing left to do."""
