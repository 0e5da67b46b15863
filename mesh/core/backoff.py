"""Exponential backoff with full jitter, as a value.

Full jitter (a uniform draw in [0, min(cap, base * 2**(n-1))]) spreads the retries of many
clients that failed together, which is the point after a shared dependency's outage (see
AWS Architecture Blog, "Exponential Backoff And Jitter"). The RNG is passed in so that tests
know every delay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """Delay before the n-th retry (n >= 1): uniform in [0, min(cap, base * 2**(n-1))]."""

    base: float = 0.25
    cap: float = 10.0

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ValueError(f"backoff base must be > 0, got {self.base}")
        if self.cap < self.base:
            raise ValueError(f"backoff cap ({self.cap}) must be >= base ({self.base})")

    def ceiling(self, attempt: int) -> float:
        """The largest delay the n-th retry can get."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        return min(self.cap, self.base * 2.0 ** min(attempt - 1, 62))

    def delay(self, attempt: int, rng: Callable[[], float]) -> float:
        """A jittered delay for the n-th retry; `rng()` returns a float in [0, 1)."""
        return rng() * self.ceiling(attempt)
