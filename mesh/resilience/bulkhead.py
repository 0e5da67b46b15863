"""Bulkhead: a cap on the calls in flight to one service, failing fast beyond it.

Named after a ship's watertight compartments (Nygard, Release It!): one slow dependency may tie
up at most `max_concurrent` of the caller's calls, instead of all its memory and its event
loop's attention. Envoy's `max_requests` circuit-breaker threshold and Hystrix's semaphore
isolation do the same. A full bulkhead refuses at once (the call loop fails the call with
RESOURCE_EXHAUSTED naming the service); it never queues, because a queue in front of a slow
service only turns its slowness into the caller's latency.

Why we write it ourselves: asyncio.Semaphore waits when full instead of refusing, and
pybreaker, purgatory and aiobreaker have no concurrency limit; this is a counter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BulkheadPolicy:
    """At most `max_concurrent` calls in flight to one service; more fail at once."""

    max_concurrent: int = 1024

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1, got {self.max_concurrent}")


class ConcurrencyLimit:
    """At most `max_concurrent` calls in flight; `try_acquire()` refuses beyond that."""

    __slots__ = ("_in_flight", "max_concurrent")

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Calls acquired and not yet released."""
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot for one call; False (and nothing taken) when all are in use."""
        if self._in_flight >= self.max_concurrent:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """Give back the slot of a call that `try_acquire()` admitted."""
        if self._in_flight <= 0:
            raise RuntimeError("ConcurrencyLimit.release() without a matching try_acquire()")
        self._in_flight -= 1
