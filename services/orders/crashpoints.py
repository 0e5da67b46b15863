"""A test-only crash switch: the orders process kills itself with SIGKILL at one boundary of a
checkout saga, so that the crash-recovery tests can crash it exactly there.

    FOODMESH_ORDERS_CRASH_AT=<when>:<step>    e.g. after:authorize_payment

`when` is `before` (the step's call is not made yet), `after` (the participant has done it,
the result is not recorded yet), `before-undo` or `after-undo` (the same around the step's
compensation). The first saga to reach the point kills the process; SIGKILL, not an exception,
because a crash runs no `finally`, releases no lease and flushes nothing, and recovery has to
cope with exactly that. Unset (always, outside tests), nothing changes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from google.protobuf.message import Message

from meshkit.saga import Step, StepContext
from meshkit.saga.steps import Action

CRASH_ENV = "FOODMESH_ORDERS_CRASH_AT"
WHEN = ("before", "after", "before-undo", "after-undo")

State = TypeVar("State")


@dataclass(frozen=True, slots=True)
class CrashPoint:
    when: str
    step: str

    @classmethod
    def parse(cls, value: str, steps: Sequence[str]) -> CrashPoint:
        """The point `value` names; ValueError (naming the variable) if it names none."""
        when, _, step = value.partition(":")
        if when not in WHEN or step not in steps:
            raise ValueError(
                f"{CRASH_ENV}={value!r}: expected <when>:<step> with when one of "
                f"{', '.join(WHEN)} and step one of {', '.join(steps)}"
            )
        return cls(when, step)


def from_environment(steps: Sequence[str]) -> CrashPoint | None:
    value = os.environ.get(CRASH_ENV, "")
    return CrashPoint.parse(value, steps) if value else None


def crashing(steps: Sequence[Step[State]], point: CrashPoint) -> tuple[Step[State], ...]:
    """The steps, with the one `point` names killing the process there."""
    wrapped = []
    for step in steps:
        if step.name == point.step:
            if point.when in ("before", "after"):
                step = replace(step, action=_crash_around(step.action, point))
            elif step.compensation is not None:
                step = replace(step, compensation=_crash_around(step.compensation, point))
        wrapped.append(step)
    return tuple(wrapped)


def _crash_around(action: Action[State], point: CrashPoint) -> Action[State]:
    async def run(state: State, context: StepContext) -> Sequence[Message]:
        if point.when.startswith("before"):
            _crash(point, context)
        events = await action(state, context)
        _crash(point, context)
        return events

    return run


def _crash(point: CrashPoint, context: StepContext) -> None:
    print(
        f"{CRASH_ENV}: {point.when}:{point.step} reached by saga {context.saga_id}; SIGKILL",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGKILL)
