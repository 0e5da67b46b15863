"""EndpointLoad: how expensive one endpoint looks right now (peak-EWMA x outstanding calls).

The measure is Finagle's and Linkerd's (tower's `balance::p2c` + `load::PeakEwma`): an
exponentially weighted moving average of response latency that jumps *up* to any sample above
it at once ("peak": a slowing endpoint is noticed after one slow answer) and otherwise decays
towards new samples with time constant `decay` (the weight of the old value is
exp(-elapsed / decay), so it is a moving average over time, not over a count of calls). The
average is multiplied by (outstanding + 1), so an endpoint with calls piling up looks worse
before those calls answer. Combined with two random choices (p2c.py) this is what Linkerd
calls "latency-aware load balancing" (Linkerd blog, "Beyond Round Robin: Load Balancing for
Latency", 2016).

Choices of ours, where the sources differ or say nothing:

- A new endpoint starts at `initial_latency`, a placeholder rather than a measurement: the
  first real answer replaces it outright instead of being blended in over `decay` seconds. The
  placeholder only decides how soon the endpoint gets its first call, so it is low (1 ms; a
  high one, like Linkerd's 30 ms, starves a new endpoint of a service that answers in 10 ms
  until the placeholder has decayed). A low one cannot flood it: until its first answer, an
  endpoint with a call outstanding costs more than any other (Finagle's PeakEwma gives an
  unmeasured node with pending calls a penalty cost in the same way), so it takes one call at
  a time until it is measured.
- While an endpoint is idle (nothing outstanding), its estimate decays towards zero with the
  time since its last sample, as in Finagle and tower: an endpoint that got one slow answer and
  was then avoided is tried again after a while. Finagle and tower decay on every read; we do
  not decay while calls are outstanding, so an endpoint that hangs (calls in flight, no
  answers) does not look cheaper the longer it hangs.
- Slow start, as Envoy's `slow_start_config`: for `warmup` seconds after it appears, an
  endpoint has a weight growing linearly (Envoy's default aggression, 1.0) from `min_weight`
  (Envoy's default min_weight_percent, 10 %) to 1, and counts each of its outstanding calls
  1/weight times. P2C evens out cost, so such an endpoint ends up with about `weight` times the
  calls in flight of its peers: the share Envoy gives a host of that weight, growing over the
  warm-up instead of jumping to a full share when it appears. Dividing the whole cost by the
  weight instead would starve it (its idle cost alone would exceed its busy peers'). With calls
  that rarely overlap there is nothing to flood, and warm-up changes little. Endpoints that
  appear together (a fresh channel) warm up together and see no difference among themselves.
  5 s by default: long enough to open connections and fill caches, short next to the decay.
- A load-shedding answer (RESOURCE_EXHAUSTED) is fast, and a latency measure would reward it:
  the endpoint that refuses work the quickest would get the most. `finish(..., penalty=True)`
  records max(`penalty`, current estimate) instead of the real latency: 1 s by default, far
  above a healthy RPC's latency, and never below what the endpoint already costs, so that
  repeated shedding keeps it expensive (it is tried again as its idle cost decays) without the
  estimate growing without bound.

Why we write it ourselves: no Python library offers P2C over peak-EWMA (pybreaker, purgatory
and aiobreaker are breakers only; grpcio has no load-balancing-policy API at all).
"""

from __future__ import annotations

import math
from collections.abc import Callable

Clock = Callable[[], float]

_MIN_SAMPLE = 1e-6
"""Samples are floored at 1 us, so a zero estimate never hides the outstanding count."""

_UNMEASURED_BUSY = 1e9
"""The cost of an endpoint with a call outstanding and no answer yet: more than any other."""


class EndpointLoad:
    """Peak-EWMA latency x (outstanding + 1), with slow start; one per endpoint.

    Every `start()` must be matched by one `finish(started)`, whatever the call's outcome.
    """

    __slots__ = (
        "_appeared",
        "_clock",
        "_ewma",
        "_inv_decay",
        "_measured",
        "_min_weight",
        "_outstanding",
        "_penalty",
        "_stamp",
        "_warm_until",
        "_warmup",
    )

    def __init__(
        self,
        clock: Clock,
        *,
        initial_latency: float = 0.001,
        decay: float = 10.0,
        warmup: float = 5.0,
        min_weight: float = 0.1,
        penalty: float = 1.0,
    ) -> None:
        if not initial_latency > 0:
            raise ValueError(f"initial_latency must be > 0, got {initial_latency}")
        if not decay > 0:
            raise ValueError(f"decay must be > 0, got {decay}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if not 0 < min_weight <= 1:
            raise ValueError(f"min_weight must be in (0, 1], got {min_weight}")
        if not penalty > 0:
            raise ValueError(f"penalty must be > 0, got {penalty}")
        now = clock()
        self._clock = clock
        self._ewma = initial_latency
        self._stamp = now
        self._measured = False
        self._outstanding = 0
        self._inv_decay = 1.0 / decay
        self._appeared = now
        self._warmup = warmup
        self._warm_until = now + warmup
        self._min_weight = min_weight
        self._penalty = penalty

    @property
    def outstanding(self) -> int:
        """Calls started and not yet finished."""
        return self._outstanding

    def start(self) -> float:
        """Count a call as outstanding; returns its start time, to give back to `finish()`."""
        self._outstanding += 1
        return self._clock()

    def finish(self, started: float, *, penalty: bool = False) -> None:
        """The call started at `started` has ended; record its latency.

        `penalty=True` for an answer that must not be rewarded for being fast (the server shed
        the call: RESOURCE_EXHAUSTED): the penalty latency is recorded instead.
        """
        if self._outstanding <= 0:
            raise RuntimeError("EndpointLoad.finish() without a matching start()")
        self._outstanding -= 1
        now = self._clock()
        ewma = self._ewma
        if penalty:
            sample = max(self._penalty, ewma)
        else:
            sample = max(now - started, _MIN_SAMPLE)
        if not self._measured:
            self._measured = True
            self._ewma = sample
        elif sample > ewma:
            self._ewma = sample
        else:
            weight = math.exp((self._stamp - now) * self._inv_decay) if now > self._stamp else 1.0
            self._ewma = ewma * weight + sample * (1.0 - weight)
        self._stamp = now

    def cost(self, now: float) -> float:
        """How expensive a call to this endpoint looks at `now`: lower is better."""
        outstanding = self._outstanding
        if not outstanding:
            if now > self._stamp:
                return self._ewma * math.exp((self._stamp - now) * self._inv_decay)
            return self._ewma
        if not self._measured:
            return _UNMEASURED_BUSY + outstanding
        if now < self._warm_until:
            weight = max(self._min_weight, (now - self._appeared) / self._warmup)
            return self._ewma * (outstanding / weight + 1)
        return self._ewma * (outstanding + 1)

    def __repr__(self) -> str:
        return f"EndpointLoad(ewma={self._ewma:.6f}, outstanding={self._outstanding})"
