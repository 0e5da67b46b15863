"""Fault injection, as Istio's: delay and/or abort a share of calls, to see resilience work.

Retries, ejection and breakers are only trusted once seen acting on real faults. A
`FaultPolicy` delays `delay_percent` % of calls by `delay_seconds` and fails
`abort_percent` % with `abort_code`; the two are drawn independently, as Istio does. It is off
by default, and an injector whose policy is off costs one attribute test per call.

Two places apply it:

- the client side (the call path, per method policy) asks a `FaultInjector` before an
  attempt: the fault happens without the call leaving the process (`sent=False` for
  mesh.core.outcome: an injected abort never reached the server);
- the server side (mesh/server/faults.py) makes one instance slow or failing for every call
  it serves.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """What faults to inject; `FaultPolicy()` injects none."""

    delay_seconds: float = 0.0
    delay_percent: float = 0.0
    """Share of calls delayed, 0..100."""
    abort_code: grpc.StatusCode | None = None
    abort_percent: float = 0.0
    """Share of calls failed with `abort_code`, 0..100."""

    def __post_init__(self) -> None:
        if not self.delay_seconds >= 0:
            raise ValueError(f"delay_seconds: must be >= 0, got {self.delay_seconds}")
        for name in ("delay_percent", "abort_percent"):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise ValueError(f"{name}: must be 0..100, got {value}")
        if self.abort_code is grpc.StatusCode.OK:
            raise ValueError("abort_code: must not be OK")
        if self.abort_percent > 0 and self.abort_code is None:
            raise ValueError("abort_code: required when abort_percent > 0")

    @property
    def active(self) -> bool:
        """True when the policy can inject anything."""
        delays = self.delay_percent > 0 and self.delay_seconds > 0
        return delays or (self.abort_percent > 0 and self.abort_code is not None)


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """The fault for one call: sleep `delay` seconds, then fail with `abort` if set."""

    delay: float = 0.0
    abort: grpc.StatusCode | None = None


NO_FAULT = FaultDecision()


def fault_message(code: grpc.StatusCode, target: str) -> str:
    """The details of a call failed by injection: says so, and names what it hit."""
    return f"injected fault: {code.name} on {target} (fault injection policy)"


class FaultInjector:
    """Draws the fault of each call from a policy and an RNG (`rng()` in [0, 1)).

    One draw per fault kind whose percentage is strictly between 0 and 100 (delay first,
    then abort); 0 and 100 need none.
    """

    __slots__ = ("_active", "_rng", "policy")

    def __init__(self, policy: FaultPolicy, rng: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rng = rng
        self._active = policy.active

    def decide(self) -> FaultDecision:
        if not self._active:
            return NO_FAULT
        policy = self.policy
        delay = policy.delay_seconds if self._hit(policy.delay_percent) else 0.0
        abort = policy.abort_code if self._hit(policy.abort_percent) else None
        if not delay and abort is None:
            return NO_FAULT
        return FaultDecision(delay, abort)

    def _hit(self, percent: float) -> bool:
        if percent <= 0:
            return False
        return percent >= 100 or self._rng() * 100 < percent
