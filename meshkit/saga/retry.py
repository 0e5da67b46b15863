"""How a saga step is retried: a policy value with Temporal's activity defaults.

Temporal retries an activity from 1 s, doubling, capped at 100 x the first interval, with no
limit on attempts: the workflow's own timeout bounds it. Here the saga's deadline is that
bound. A code that says the request itself is wrong (INVALID_ARGUMENT, FAILED_PRECONDITION,
...) ends the step at once: asking again cannot succeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

NON_RETRYABLE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Codes that end a step at once: the participant refused the request itself."""


@dataclass(frozen=True, slots=True)
class StepRetry:
    """When a failed step (or compensation) is tried again."""

    initial_interval: float = 1.0
    backoff_coefficient: float = 2.0
    maximum_interval: float = 100.0
    maximum_attempts: int = 0
    """0: no limit but the saga's deadline (compensations: no limit at all)."""
    non_retryable: frozenset[grpc.StatusCode] = field(default=NON_RETRYABLE)

    def __post_init__(self) -> None:
        if not self.initial_interval > 0:
            raise ValueError(f"initial_interval: must be > 0, got {self.initial_interval}")
        if not self.backoff_coefficient >= 1:
            raise ValueError(f"backoff_coefficient: must be >= 1, got {self.backoff_coefficient}")
        if not self.maximum_interval >= self.initial_interval:
            raise ValueError(
                f"maximum_interval: must be >= initial_interval ({self.initial_interval}), "
                f"got {self.maximum_interval}"
            )
        if self.maximum_attempts < 0:
            raise ValueError(f"maximum_attempts: must be >= 0, got {self.maximum_attempts}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 = the first)."""
        try:
            grown = self.initial_interval * self.backoff_coefficient ** (attempt - 1)
        except OverflowError:
            # A compensation retries without end: past ~1000 doublings a float overflows.
            return self.maximum_interval
        return min(grown, self.maximum_interval)

    def retries(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether a failure with `code` on attempt `attempt` is tried again."""
        if code in self.non_retryable:
            return False
        return self.maximum_attempts == 0 or attempt < self.maximum_attempts
