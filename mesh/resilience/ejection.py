"""Outlier ejection: take an endpoint that keeps failing out of the rotation for a while.

Envoy's outlier detection, consecutive-5xx flavour (Envoy docs, "Outlier detection"): after
`consecutive_failures` failures in a row (a success in between resets the count), the endpoint
is ejected for `base_time * times_ejected`, capped at `max_time`, so an endpoint that keeps
coming back broken stays out longer each time. The ejection time is jittered by +-`jitter`
(a fraction of it) so that endpoints ejected together (a shared dependency failed) do not all
come back in the same instant; the jitter applies after the cap, so that capped ejections are
spread too (the longest is max_time * (1 + jitter)). The breaker (breaker.py) protects the
caller from a whole service; ejection routes around one bad instance while its siblings carry
the load.

Where we differ from Envoy, and why:

- Envoy un-ejects on a timer and lets full traffic back at once. We go half-open instead, as a
  circuit breaker does: when its time is up, an endpoint may take exactly ONE probe call (the
  first pick of it claims the probe: `on_picked()` returns True); a success brings it back
  fully, a failure ejects it again for longer. The call loop reports every picked call with
  `on_success`, `on_failure` or `on_neutral`; should a probe never be reported (a bug), it is
  presumed lost after `probe_timeout` and another may go.
- `times_ejected` decays as in Envoy, which decrements its multiplier each interval the host
  stays healthy; we have no timer, so the decay is settled lazily at the next ejection: one
  step per `base_time` of health since the last un-ejection.
- `max_ejection_percent` is enforced when candidates are chosen, not when an endpoint is
  ejected, so it holds even after discovery shrinks the set. At most floor(n * percent / 100)
  endpoints are kept out, but at least one may be (Envoy: "will eject at least one host
  regardless of the value"), unless percent is 0; and at least one endpoint is always left
  available. When more are ejected than allowed, those whose ejection ends soonest are let
  back: the least-ejected and the longest-out, the likeliest to have recovered. A let-back
  endpoint is still ejected: its results change nothing until its probe.
- Results of calls that started before an ejection and end during it are ignored: only the
  probe decides whether an ejected endpoint is healthy again.
- A lost connection is a failure that needs no confirmation: `eject_now()` ejects at once
  (Envoy counts such local-origin failures separately, with their own consecutive threshold).

Why we write it ourselves: pybreaker has no asyncio support and no per-endpoint ejection;
purgatory and aiobreaker are per-service breakers with no ejection either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """Outlier ejection: take an endpoint out after consecutive failures, for a time that
    grows with each ejection (base_time * n, at most max_time, +/- jitter)."""

    consecutive_failures: int = 5
    base_time: float = 30.0
    max_time: float = 300.0
    max_ejection_percent: float = 50.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures: must be >= 1, got {self.consecutive_failures}")
        if not self.base_time > 0:
            raise ValueError(f"base_time: must be > 0, got {self.base_time}")
        if not self.max_time >= self.base_time:
            raise ValueError(
                f"max_time: must be >= base_time ({self.base_time}), got {self.max_time}"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(
                f"max_ejection_percent: must be 0..100, got {self.max_ejection_percent}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter: must be 0..1, got {self.jitter}")


class EjectionState:
    """One endpoint's ejection bookkeeping; the OutlierDetector changes it.

    Healthy: `ejected_until` is None. Ejected: `now < ejected_until`. Half-open: the time is up
    and the next pick claims the probe (`probing` becomes True, and `ejected_until` the probe's
    deadline, so no second call goes to it meanwhile).
    """

    __slots__ = (
        "consecutive_failures",
        "ejected_until",
        "healthy_since",
        "name",
        "probing",
        "times_ejected",
    )

    def __init__(self, name: str = "") -> None:
        self.name = name
        """The endpoint, for log lines (its address)."""
        self.consecutive_failures = 0
        self.times_ejected = 0
        """Ejections so far, less the decay settled at the last ejection."""
        self.ejected_until: float | None = None
        self.probing = False
        self.healthy_since = 0.0
        """When the last ejection ended (the start of the health that decays times_ejected)."""

    def ejected(self, now: float) -> bool:
        """Whether the endpoint is out of the rotation at `now` (a claimed probe counts)."""
        until = self.ejected_until
        return until is not None and now < until

    def __repr__(self) -> str:
        return (
            f"EjectionState({self.name!r}, failures={self.consecutive_failures}, "
            f"times_ejected={self.times_ejected}, ejected_until={self.ejected_until}, "
            f"probing={self.probing})"
        )


class HasEjection(Protocol):
    """Anything the detector can filter: it carries its EjectionState."""

    @property
    def ejection(self) -> EjectionState: ...


E = TypeVar("E", bound=HasEjection)


class OutlierDetector:
    """Ejects failing endpoints and lets them back through single probes; one per service."""

    def __init__(
        self,
        policy: EjectionPolicy,
        clock: Callable[[], float],
        rng: Callable[[], float],
        *,
        service: str = "",
        probe_timeout: float = 30.0,
    ) -> None:
        if not probe_timeout > 0:
            raise ValueError(f"probe_timeout must be > 0, got {probe_timeout}")
        self.policy = policy
        self.service = service
        self._clock = clock
        self._rng = rng
        self._probe_timeout = probe_timeout

    def on_success(self, state: EjectionState) -> None:
        """A call to the endpoint succeeded."""
        state.consecutive_failures = 0
        if state.probing:
            state.probing = False
            state.ejected_until = None
            state.healthy_since = self._clock()
            log.info("%s: endpoint %s is back after a successful probe", self.service, state.name)

    def on_failure(self, state: EjectionState) -> None:
        """A call to the endpoint failed (an outcome that counts against the endpoint)."""
        if state.probing:
            state.probing = False
            self._eject(state, self._clock(), "its probe failed")
            return
        if state.ejected_until is not None:
            return  # a call from before the ejection; only the probe decides
        state.consecutive_failures += 1
        if state.consecutive_failures >= self.policy.consecutive_failures:
            self._eject_healthy(state, f"{state.consecutive_failures} consecutive failures")

    def eject_now(self, state: EjectionState) -> None:
        """A failure that needs no confirmation (the connection to the endpoint was lost):
        eject without waiting for `consecutive_failures`, as a failed probe would."""
        if state.probing:
            state.probing = False
            self._eject(state, self._clock(), "its probe lost the connection")
        elif state.ejected_until is None:
            self._eject_healthy(state, "a lost connection")

    def on_neutral(self, state: EjectionState) -> None:
        """A call to the endpoint ended with no verdict (cancelled by the caller, say).

        A probe that ends so frees the endpoint for another probe at once.
        """
        if state.probing:
            state.probing = False
            state.ejected_until = self._clock()

    def on_picked(self, state: EjectionState) -> bool:
        """The balancer chose this endpoint for a call; True when that call is its probe.

        Call it for every pick (it is one attribute test for a healthy endpoint): the first
        pick of a half-open endpoint claims its single probe.
        """
        until = state.ejected_until
        if until is None:
            return False
        now = self._clock()
        if now < until:
            return False
        state.probing = True
        state.ejected_until = now + self._probe_timeout
        return True

    def available(self, candidates: Sequence[E]) -> Sequence[E]:
        """The candidates calls may go to: not ejected, within the max-ejection rules.

        Returns `candidates` itself (no allocation) when none is ejected.
        """
        for candidate in candidates:
            if candidate.ejection.ejected_until is not None:
                break
        else:
            return candidates
        now = self._clock()
        up: list[E] = []
        out: list[E] = []
        for candidate in candidates:
            until = candidate.ejection.ejected_until
            if until is None or now >= until:
                up.append(candidate)
            else:
                out.append(candidate)
        if not out:
            return candidates
        allowed = self._max_ejected(len(candidates))
        if len(out) > allowed:
            out.sort(key=_ejection_end)
            up.extend(out[: len(out) - allowed])
        return up

    def _max_ejected(self, n: int) -> int:
        percent = self.policy.max_ejection_percent
        if percent <= 0:
            return 0
        return min(max(1, math.floor(n * percent / 100.0)), n - 1)

    def _eject_healthy(self, state: EjectionState, reason: str) -> None:
        """Eject an endpoint that was in the rotation, settling the decay of times_ejected."""
        now = self._clock()
        if state.times_ejected:
            healed = int((now - state.healthy_since) / self.policy.base_time)
            state.times_ejected = max(0, state.times_ejected - healed)
        self._eject(state, now, reason)

    def _eject(self, state: EjectionState, now: float, reason: str) -> None:
        policy = self.policy
        state.times_ejected += 1
        state.consecutive_failures = 0
        duration = min(policy.base_time * state.times_ejected, policy.max_time)
        duration *= 1.0 + policy.jitter * (2.0 * self._rng() - 1.0)
        state.ejected_until = now + duration
        log.warning(
            "%s: ejected endpoint %s for %.1fs after %s (ejection #%d)",
            self.service,
            state.name,
            duration,
            reason,
            state.times_ejected,
        )


def _ejection_end(candidate: HasEjection) -> float:
    until = candidate.ejection.ejected_until
    return until if until is not None else -math.inf
