"""Everything the call path keeps per service (an Envoy "cluster"): the retry budget, the
circuit breaker, the concurrency limit, outlier ejection, the balancer and recent latencies,
and the per-method plans compiled from the policy (timeout, retry or hedge policy, the
classifier, and the admission built in mesh/layers.py's order).

The policies are values and the state machines small objects of their own, side by side in
mesh/resilience/ (retry, breaker, bulkhead, ejection, balance); this module only holds one of
each per service and offers the two things every attempt needs: `pick()` an endpoint
and `record()` how the attempt ended. The attempt loops live in mesh/client/unary_call.py,
stream_call.py and hedging.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc import aio
from opentelemetry import trace

from mesh import layers
from mesh.client.admission import (
    Admission,
    BreakerGate,
    BudgetGate,
    BulkheadGate,
    DeadlineGate,
    FaultGate,
    Gate,
)
from mesh.client.subchannels import SubChannel, SubChannelPool
from mesh.core.outcome import Classified, Classifier, Outcome
from mesh.core.plumbing import is_plumbing
from mesh.policy import MethodPolicy, ServicePolicy
from mesh.resilience.balance import new_balancer
from mesh.resilience.balance.latency import RecentLatencies
from mesh.resilience.breaker import CircuitBreaker
from mesh.resilience.bulkhead import ConcurrencyLimit
from mesh.resilience.ejection import OutlierDetector
from mesh.resilience.faults import FaultInjector
from mesh.resilience.retry.budget import RetryBudget
from mesh.resilience.retry.hedge import HedgePolicy
from mesh.resilience.retry.policy import RetryPolicy, method_is_idempotent
from mesh.telemetry.metrics import AttemptKind, MeshMetrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Rng = Callable[[], float]


@dataclass(frozen=True, slots=True)
class MethodPlan:
    """What the call path needs to know about one method, resolved once per method."""

    full_method: str
    timeout: float
    retry: RetryPolicy
    idempotent: bool
    hedge: HedgePolicy | None
    admission: Admission
    """The gates its calls pass before the first attempt (mesh/client/admission.py)."""
    classifier: Classifier
    """What each status code of its attempts and calls says (mesh/core/outcome.py)."""
    tracer: trace.Tracer | None = None
    """Where its call and attempt spans come from; None when tracing is off, and for health
    checks and reflection, which make no spans."""

    @classmethod
    def compile(cls, full_method: str, policy: MethodPolicy, upstream: Upstream) -> MethodPlan:
        idempotent = method_is_idempotent(full_method, policy.idempotent)
        hedge = policy.hedge if idempotent else None
        if policy.hedge is not None and not idempotent:
            log.warning("hedging of %s ignored: the method is not safe to repeat", full_method)
        tracer = upstream.tracer
        if tracer is not None and is_plumbing(full_method):
            tracer = None
        admission = upstream.admission(full_method, policy)
        return cls(
            full_method,
            policy.timeout,
            policy.retry,
            idempotent,
            hedge,
            admission,
            policy.classifier,
            tracer,
        )


class Upstream:
    """One service as the call path sees it."""

    def __init__(
        self,
        service: str,
        policy: ServicePolicy,
        pool: SubChannelPool,
        *,
        clock: Clock = time.monotonic,
        rng: Rng = random.random,
        tracer: trace.Tracer | None = None,
        metrics: MeshMetrics | None = None,
    ) -> None:
        self.service = service
        self.tracer = tracer
        """Set when tracing is on: the mesh's call and attempt spans come from it."""
        self.metrics = metrics
        """Set when the process exports metrics: calls, attempts, breaker, ejections."""
        self.policy = policy
        self.pool = pool
        self.clock = clock
        self.rng = rng
        self.budget = RetryBudget(policy.budget, clock=clock)
        self.breaker = CircuitBreaker(service, policy.breaker, clock=clock)
        self.bulkhead = ConcurrencyLimit(policy.bulkhead.max_concurrent)
        self.ejection = OutlierDetector(policy.ejection, clock=clock, rng=rng)
        self.balancer = new_balancer(policy.balancer, rng)
        self.latencies = RecentLatencies(clock=clock)
        self.hedging = policy.defaults.hedge is not None or any(
            method.hedge is not None for method in policy.methods.values()
        )
        """Some method hedges: only then are recent latencies (the hedge delay) kept."""
        self._breaker_gate = BreakerGate(self.breaker)
        self._bulkhead_gate = BulkheadGate(service, self.bulkhead)
        self._budget_gate = BudgetGate(self.budget)
        self._plans: dict[str, MethodPlan] = {}
        if metrics is not None:
            metrics.breaker_state(service, str(self.breaker.state))
            self.breaker.add_listener(metrics.breaker_changed)

    def plan(self, full_method: str) -> MethodPlan:
        """The compiled plan of `full_method` ("/pkg.Service/Method")."""
        plan = self._plans.get(full_method)
        if plan is None:
            name = full_method.rsplit("/", 1)[-1]
            plan = MethodPlan.compile(full_method, self.policy.for_method(name), self)
            self._plans[full_method] = plan
        return plan

    def admission(self, full_method: str, policy: MethodPolicy) -> Admission:
        """The admission of `full_method`'s calls: the gates of the layers that act before
        any attempt, in mesh/layers.py's order, less those its policy leaves off."""
        clock = self.clock
        gates: dict[str, Gate | None] = {
            layers.DEADLINE: DeadlineGate(self.service, full_method, clock),
            layers.FAULTS: (
                FaultGate(FaultInjector(policy.fault, self.rng), full_method, clock)
                if policy.fault.active
                else None
            ),
            layers.BREAKER: self._breaker_gate,
            layers.BULKHEAD: self._bulkhead_gate,
            layers.RETRY: self._budget_gate,
        }
        return Admission(gate for name in layers.ADMISSION if (gate := gates[name]) is not None)

    def pick(self, exclude: SubChannel | None = None) -> SubChannel | None:
        """An endpoint for the next attempt: not ejected, chosen by the balancer, avoiding
        `exclude` (where the previous attempt failed) when there is another."""
        candidates = self.ejection.available(self.pool.subchannels())
        sub = self.balancer.pick(candidates, self.clock(), exclude)
        if sub is not None:
            self.ejection.on_picked(sub.ejection)
        return sub

    def record(self, sub: SubChannel, started: float, classified: Classified) -> None:
        """How an attempt on `sub` ended: feeds its load, its ejection state and latencies."""
        outcome = classified.outcome
        sub.load.finish(started, penalty=classified.code is grpc.StatusCode.RESOURCE_EXHAUSTED)
        if outcome is Outcome.FAILURE:
            was_ejected = sub.ejection.ejected_until is not None
            if classified.connection_lost:
                self.ejection.eject_now(sub.ejection)
            else:
                self.ejection.on_failure(sub.ejection)
            if self.metrics is not None and not was_ejected and sub.ejection.ejected_until:
                self.metrics.ejected(self.service)
                self._count_ejected()
        elif outcome is Outcome.NEUTRAL:
            self.ejection.on_neutral(sub.ejection)
        else:
            was_ejected = sub.ejection.ejected_until is not None
            self.ejection.on_success(sub.ejection)
            if was_ejected and self.metrics is not None:
                self._count_ejected()
            if self.hedging:
                self.latencies.add(self.clock() - started)

    def _count_ejected(self) -> None:
        assert self.metrics is not None
        ejected = sum(1 for s in self.pool.subchannels() if s.ejection.ejected_until is not None)
        self.metrics.ejections_changed(self.service, ejected)

    def attempt_started(self, method: str, previous: int, hedge: bool = False) -> None:
        """Count an attempt (first, retry or hedge) when metrics are on."""
        if self.metrics is not None:
            kind: AttemptKind = "hedge" if hedge else ("retry" if previous else "first")
            self.metrics.client_attempt(self.service, method, kind)

    def budget_exhausted(self) -> None:
        if self.metrics is not None:
            self.metrics.budget_exhausted(self.service)

    def call_finished(self, method: str, error: BaseException | None, seconds: float) -> None:
        """Count a finished call by its final status when metrics are on."""
        if self.metrics is None:
            return
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, aio.AioRpcError):
            code = error.code()
        else:
            code = grpc.StatusCode.CANCELLED
        self.metrics.client_call_finished(self.service, method, code, seconds)

    def hedge_delay(self, hedge: HedgePolicy) -> float | None:
        """Seconds before a hedge is sent: the policy's, or the recent p95 latency."""
        if hedge.delay is not None:
            return hedge.delay
        return self.latencies.quantile(0.95)
