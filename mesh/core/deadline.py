"""Deadlines: a value on a monotonic clock, carried from an inbound call to outbound ones.

A call's deadline is a point in time, not a duration: every layer below asks how much of it
is left, and a retry or hedge gets only that. A server that calls other services while it
serves a call must not give them more time than its own caller gave it (gRPC's deadline
propagation), or work goes on after the caller has given up. So:

- `DeadlineInterceptor` (server side) turns each inbound call's remaining time into a
  `Deadline` and runs the servicer with it in a `contextvars.ContextVar`, so each call, and
  each task it starts, sees its own; there is no global to leak between calls. It refuses to
  start a call whose deadline has already passed (it waited in a queue too long): the work
  would be thrown away.
- `outbound_timeout` (client side) gives an outbound call the inbound call's remaining time
  minus a margin, unless the caller asks for less; without either, the default.

The margin (`DEFAULT_MARGIN`, 5 ms) is a fixed time, not a share of the budget: it pays for
the reply's trip back through this server (one network hop, deserialising, our own handler
finishing), so that the downstream deadline fires first and this server still answers its
caller with the downstream's error instead of timing out blind. That cost does not grow with
the deadline; 5% of a 10 s budget would waste 500 ms. A remaining time at or below the
margin gives 0: no time, and the mechanism refuses to start an attempt.

The server side's half, the interceptor, is mesh/server/deadline.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Clock = Callable[[], float]

DEFAULT_MARGIN = 0.005
"""Seconds an outbound call's deadline keeps short of the inbound call's (see module doc)."""


@dataclass(frozen=True, slots=True, order=True)
class Deadline:
    """A point in time on a monotonic clock (seconds, as `clock()` returns them)."""

    at: float

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.monotonic) -> Deadline:
        """The deadline `seconds` from now."""
        return cls(clock() + seconds)

    def remaining(self, clock: Clock = time.monotonic) -> float:
        """Seconds left; 0.0 once passed, never negative."""
        return max(self.at - clock(), 0.0)

    def expired(self, clock: Clock = time.monotonic) -> bool:
        return clock() >= self.at


_INBOUND: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "foodmesh_inbound_deadline", default=None
)


def current_deadline() -> Deadline | None:
    """The deadline of the inbound call being served in this context, if any."""
    return _INBOUND.get()


@contextlib.contextmanager
def inbound_deadline(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Run a block as if serving an inbound call with `deadline` (None: without one)."""
    token = _INBOUND.set(deadline)
    try:
        yield deadline
    finally:
        _INBOUND.reset(token)


def outbound_timeout(
    caller_timeout: float | None,
    default: float,
    *,
    margin: float = DEFAULT_MARGIN,
    clock: Clock = time.monotonic,
) -> float:
    """The timeout (seconds, >= 0) of an outbound call made in this context.

    The shorter of the caller's timeout and the inbound call's remaining time less `margin`;
    `default` when there is neither (the default never stretches nor cuts an inbound
    deadline: the caller upstream chose it). 0.0 means no time is left.
    """
    inbound = _INBOUND.get()
    if inbound is None:
        timeout = default if caller_timeout is None else caller_timeout
    else:
        timeout = inbound.at - clock() - margin
        if caller_timeout is not None and caller_timeout < timeout:
            timeout = caller_timeout
    return timeout if timeout > 0.0 else 0.0


def set_inbound_deadline(deadline: Deadline | None) -> contextvars.Token[Deadline | None]:
    """Serve the current context with `deadline` until `reset_inbound_deadline(token)`: for
    a server interceptor, whose enter and leave are two calls (inbound_deadline is a block)."""
    return _INBOUND.set(deadline)


def reset_inbound_deadline(token: contextvars.Token[Deadline | None]) -> None:
    _INBOUND.reset(token)
