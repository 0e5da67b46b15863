"""Admission: what a call passes before its first attempt, one path for every call shape.

The layers that act before any attempt (mesh/layers.py, ADMISSION) are gates, entered in
that order: the deadline (no time left: DEADLINE_EXCEEDED), client-side faults (a delay,
an abort), the breaker (open: UNAVAILABLE), the bulkhead (full: RESOURCE_EXHAUSTED), and the
retry layer, which counts the admitted call for the service's budget. A gate that refuses
lets the gates before it go with a NEUTRAL verdict (a breaker's half-open probe slot is given
back when the bulkhead refuses), and nothing is sent. An admitted call is released once, with
its verdict (how it ended, as the method's classifier says), which the gates with state
(breaker, bulkhead) take.

Unary and streaming calls, hedged or not, admit and release through the same Admission, so
the rules cannot drift apart between call shapes. A plan whose gates include a fault delay
must be admitted by awaiting (`admit_waiting`, which any call already in a coroutine uses);
the others may admit synchronously (`admit`), which keeps the unary hot path free of
coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from mesh.core.errors import BulkheadFull, CircuitOpen, NoTimeLeft, RefusedByMesh
from mesh.core.outcome import Outcome
from mesh.resilience.breaker import CircuitBreaker
from mesh.resilience.bulkhead import ConcurrencyLimit
from mesh.resilience.faults import FaultInjector, fault_message
from mesh.resilience.retry.budget import RetryBudget

Clock = Callable[[], float]


class Gate(Protocol):
    """One admission step. `enter` may refuse the call (its error) or let it pass (None);
    `leave` takes an admitted call's verdict (gates without state ignore it)."""

    def enter(self, deadline: float) -> RefusedByMesh | None: ...

    def leave(self, verdict: Outcome) -> None: ...


class DeadlineGate:
    """No time left for the call: refused before anything else is asked."""

    __slots__ = ("_clock", "_method", "_service")

    def __init__(self, service: str, method: str, clock: Clock) -> None:
        self._service, self._method, self._clock = service, method, clock

    def enter(self, deadline: float) -> RefusedByMesh | None:
        if deadline - self._clock() > 0:
            return None
        return NoTimeLeft(self._service, self._method).to_rpc_error()

    def leave(self, verdict: Outcome) -> None:
        pass


class FaultGate:
    """Client-side fault injection: the drawn delay (within the deadline), then the abort."""

    __slots__ = ("_clock", "_injector", "_method")

    def __init__(self, injector: FaultInjector, method: str, clock: Clock) -> None:
        self._injector, self._method, self._clock = injector, method, clock

    def enter(self, deadline: float) -> RefusedByMesh | None:
        raise RuntimeError("a fault gate may delay the call: admit it with admit_waiting()")

    async def wait(self, deadline: float) -> RefusedByMesh | None:
        decision = self._injector.decide()
        if decision.delay > 0:
            await asyncio.sleep(min(decision.delay, max(deadline - self._clock(), 0.0)))
        if decision.abort is None:
            return None
        return RefusedByMesh(decision.abort, fault_message(decision.abort, self._method))

    def leave(self, verdict: Outcome) -> None:
        pass


class BreakerGate:
    """The service's circuit breaker: open refuses; the verdict is what it counts."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def enter(self, deadline: float) -> RefusedByMesh | None:
        if self._breaker.allow():
            return None
        return CircuitOpen(self._breaker.service).to_rpc_error()

    def leave(self, verdict: Outcome) -> None:
        if verdict is Outcome.FAILURE:
            self._breaker.record(False)
        elif verdict is Outcome.NEUTRAL:
            self._breaker.record_neutral()
        else:
            self._breaker.record(True)


class BulkheadGate:
    """The service's cap on calls in flight: full refuses; leaving gives the slot back."""

    __slots__ = ("_limit", "_service")

    def __init__(self, service: str, limit: ConcurrencyLimit) -> None:
        self._service, self._limit = service, limit

    def enter(self, deadline: float) -> RefusedByMesh | None:
        if self._limit.try_acquire():
            return None
        return BulkheadFull(self._service, self._limit.max_concurrent).to_rpc_error()

    def leave(self, verdict: Outcome) -> None:
        self._limit.release()


class BudgetGate:
    """The retry layer's part in admission: every admitted call earns the budget its share."""

    __slots__ = ("_budget",)

    def __init__(self, budget: RetryBudget) -> None:
        self._budget = budget

    def enter(self, deadline: float) -> RefusedByMesh | None:
        self._budget.deposit()
        return None

    def leave(self, verdict: Outcome) -> None:
        pass


_STATELESS = (DeadlineGate, FaultGate, BudgetGate)


class Admission:
    """The gates of one method's calls, in the layers' order."""

    __slots__ = ("_exits", "_gates", "waits")

    def __init__(self, gates: Iterable[Gate]) -> None:
        self._gates = tuple(gates)
        self._exits = tuple(g for g in reversed(self._gates) if not isinstance(g, _STATELESS))
        self.waits = any(isinstance(gate, FaultGate) for gate in self._gates)
        """A gate may delay the call: it is admitted by `admit_waiting`, never `admit`."""

    def admit(self, deadline: float) -> RefusedByMesh | None:
        """Pass every gate now, or the refusal of the first that says no."""
        for index, gate in enumerate(self._gates):
            refusal = gate.enter(deadline)
            if refusal is not None:
                self._unwind(index)
                return refusal
        return None

    async def admit_waiting(self, deadline: float) -> RefusedByMesh | None:
        """As `admit`, for plans whose gates may wait (a fault delay)."""
        for index, gate in enumerate(self._gates):
            if isinstance(gate, FaultGate):
                refusal = await gate.wait(deadline)
            else:
                refusal = gate.enter(deadline)
            if refusal is not None:
                self._unwind(index)
                return refusal
        return None

    def release(self, verdict: Outcome) -> None:
        """An admitted call ended so: tell the gates with state, last entered first."""
        for gate in self._exits:
            gate.leave(verdict)

    def _unwind(self, refused_at: int) -> None:
        for gate in reversed(self._gates[:refused_at]):
            gate.leave(Outcome.NEUTRAL)
