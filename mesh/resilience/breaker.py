"""Circuit breaker per service: stop calling a service that is failing, and probe for recovery.

Nygard's circuit breaker (Release It!, 2007), in the failure-rate form of Resilience4j and
Hystrix: the breaker is CLOSED while the share of failed calls in a rolling time window stays
below `failure_rate_threshold`, or while the window holds fewer than `minimum_calls` calls (two
failures out of three calls say nothing). When it trips, it is OPEN for `open_time` seconds:
`allow()` is False and the call loop fails the call at once (UNAVAILABLE, "circuit for service
X is open") instead of adding load to a service that is down and making the caller wait for
it. Then it is HALF_OPEN: `half_open_calls` probe calls go through; if all succeed it closes
with a fresh window, and the first failure opens it again. The policy's defaults are Hystrix's
(20 calls, 50 %, a 10 s window, 5 s open).

The window is `buckets` buckets of window/buckets seconds each, with running totals, so
`record()` is O(1) (a sliding window of every call would be O(calls)). The window therefore
spans between window * (buckets - 1) / buckets and window seconds, depending on where in the
current bucket `now` falls.

States are small classes, each knowing what `allow()` and `record()` mean in it (pybreaker's
design); every change of state goes through `_enter()`, which logs it (WARNING on opening,
INFO otherwise) and calls the listeners with (service, old, new).

Rules for the caller, the call loop:
- A call `allow()` refused is never made, so it is never recorded.
- Every admitted call ends in `record(success)` or, when it has no verdict (cancelled by the
  caller: a NEUTRAL outcome), `record_neutral()`, which gives a half-open probe slot back. Should
  all probes go unreported (a bug), a new half-open round starts after `open_time`.
- Results that arrive while OPEN come from calls admitted before it opened: they are ignored.
  In HALF_OPEN a result cannot be told apart from a probe's and counts as one.

Why we write it ourselves: pybreaker has no asyncio support and no per-endpoint ejection;
purgatory and aiobreaker have no ejection either, and all three count consecutive failures,
not a failure rate over a time window.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

log = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Circuit breaker: open when the failure rate over `window` s reaches the threshold
    (given at least `minimum_calls`), stay open `open_time` s, then probe with
    `half_open_calls` calls."""

    failure_rate_threshold: float = 0.5
    minimum_calls: int = 20
    window: float = 10.0
    open_time: float = 5.0
    half_open_calls: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError(
                f"failure_rate_threshold: must be in (0, 1], got {self.failure_rate_threshold}"
            )
        if self.minimum_calls < 1:
            raise ValueError(f"minimum_calls: must be >= 1, got {self.minimum_calls}")
        if not self.window > 0:
            raise ValueError(f"window: must be > 0, got {self.window}")
        if not self.open_time > 0:
            raise ValueError(f"open_time: must be > 0, got {self.open_time}")
        if self.half_open_calls < 1:
            raise ValueError(f"half_open_calls: must be >= 1, got {self.half_open_calls}")


Listener = Callable[[str, BreakerState, BreakerState], None]
"""Called as listener(service, old_state, new_state) on every change of state."""


class RollingWindow:
    """Calls and failures in the last `window` seconds, kept in `buckets` time buckets."""

    __slots__ = ("_bucket_calls", "_bucket_failures", "_epoch", "_width", "calls", "failures")

    def __init__(self, window: float, buckets: int = 10) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self._width = window / buckets
        self._bucket_calls = [0] * buckets
        self._bucket_failures = [0] * buckets
        self._epoch = 0
        self.calls = 0
        self.failures = 0

    def add(self, failed: bool, now: float) -> None:
        """Count one call that ended at `now`."""
        epoch = int(now // self._width)
        if epoch > self._epoch:
            self._advance(epoch)
        slot = self._epoch % len(self._bucket_calls)
        self._bucket_calls[slot] += 1
        self.calls += 1
        if failed:
            self._bucket_failures[slot] += 1
            self.failures += 1

    def reset(self) -> None:
        """Forget every call."""
        buckets = len(self._bucket_calls)
        self._bucket_calls = [0] * buckets
        self._bucket_failures = [0] * buckets
        self.calls = 0
        self.failures = 0

    def _advance(self, epoch: int) -> None:
        """Empty the buckets of the epochs after the current one, up to `epoch`."""
        buckets = len(self._bucket_calls)
        if epoch - self._epoch >= buckets:
            self.reset()
        else:
            calls, failures = self._bucket_calls, self._bucket_failures
            for passed in range(self._epoch + 1, epoch + 1):
                slot = passed % buckets
                self.calls -= calls[slot]
                self.failures -= failures[slot]
                calls[slot] = 0
                failures[slot] = 0
        self._epoch = epoch


class _Closed:
    name = BreakerState.CLOSED
    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        breaker._window.reset()

    def allow(self) -> bool:
        return True

    def record(self, success: bool) -> None:
        breaker = self._breaker
        window = breaker._window
        window.add(not success, breaker._clock())
        policy = breaker.policy
        if (
            window.calls >= policy.minimum_calls
            and window.failures >= policy.failure_rate_threshold * window.calls
        ):
            breaker._enter(
                BreakerState.OPEN,
                f"{window.failures} of {window.calls} calls failed in the last {policy.window:g}s",
            )

    def record_neutral(self) -> None:
        pass


class _Open:
    name = BreakerState.OPEN
    __slots__ = ("_breaker", "_until")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._until = breaker._clock() + breaker.policy.open_time

    def allow(self) -> bool:
        breaker = self._breaker
        if breaker._clock() < self._until:
            return False
        breaker._enter(BreakerState.HALF_OPEN, "its open time is over")
        return breaker._state.allow()

    def record(self, success: bool) -> None:
        pass  # a call admitted before the circuit opened

    def record_neutral(self) -> None:
        pass


class _HalfOpen:
    name = BreakerState.HALF_OPEN
    __slots__ = ("_admitted", "_breaker", "_since", "_succeeded")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._since = breaker._clock()
        self._admitted = 0
        self._succeeded = 0

    def allow(self) -> bool:
        breaker = self._breaker
        if self._admitted >= breaker.policy.half_open_calls:
            now = breaker._clock()
            if now - self._since < breaker.policy.open_time:
                return False
            self._since = now  # the probes went unreported: start a new round
            self._admitted = self._succeeded = 0
        self._admitted += 1
        return True

    def record(self, success: bool) -> None:
        breaker = self._breaker
        if not success:
            breaker._enter(BreakerState.OPEN, "a probe call failed")
            return
        self._succeeded += 1
        if self._succeeded >= breaker.policy.half_open_calls:
            breaker._enter(BreakerState.CLOSED, f"{self._succeeded} probe calls succeeded")

    def record_neutral(self) -> None:
        if self._admitted > self._succeeded:
            self._admitted -= 1


_State: TypeAlias = _Closed | _Open | _HalfOpen
_STATES: dict[BreakerState, Callable[[CircuitBreaker], _State]] = {
    BreakerState.CLOSED: _Closed,
    BreakerState.OPEN: _Open,
    BreakerState.HALF_OPEN: _HalfOpen,
}


class CircuitBreaker:
    """The breaker of calls to one service (see the module docstring for the caller's rules)."""

    def __init__(
        self,
        service: str,
        policy: BreakerPolicy,
        clock: Callable[[], float],
        *,
        buckets: int = 10,
    ) -> None:
        self.service = service
        self.policy = policy
        self._clock = clock
        self._window = RollingWindow(policy.window, buckets)
        self._listeners: list[Listener] = []
        self._state: _State = _Closed(self)

    @property
    def state(self) -> BreakerState:
        return self._state.name

    def allow(self) -> bool:
        """Whether a call may go now (in HALF_OPEN, True takes one of the probe slots)."""
        return self._state.allow()

    def record(self, success: bool) -> None:
        """The verdict of a call `allow()` admitted."""
        self._state.record(success)

    def record_neutral(self) -> None:
        """A call `allow()` admitted ended without a verdict; it counts for nothing."""
        self._state.record_neutral()

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(service, old_state, new_state)` on every change of state."""
        self._listeners.append(listener)

    def _enter(self, new: BreakerState, reason: str) -> None:
        old = self._state.name
        self._state = _STATES[new](self)
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit for service %r is %s: %s", self.service, new.value, reason)
        for listener in self._listeners:
            try:
                listener(self.service, old, new)
            except Exception:
                log.exception("circuit breaker listener %r failed", listener)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.service!r}, {self._state.name.value})"
