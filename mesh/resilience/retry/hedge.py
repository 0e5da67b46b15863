"""Hedging's policy: when to send a second copy of a slow call, and how many.

"The Tail at Scale" (Dean and Barroso, 2013): once an attempt has taken longer than most do,
send the same request to another endpoint and take whichever answers first. gRPC's retry
design (A6) puts a hedging policy beside the retry policy, as an alternative to it for a
method; grpcio implements neither, so the mesh does. The race itself is mechanism, in the
call path (mesh/client/hedging.py); every hedge takes a token from the retry budget
(budget.py), so hedging cannot multiply load in an outage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """Send up to `max_hedges` extra copies of a slow call (idempotent methods only)."""

    delay: float | None = None
    """Seconds before a hedge is sent; None: the endpoint set's p95 latency."""
    max_hedges: int = 1

    def __post_init__(self) -> None:
        if self.delay is not None and not self.delay >= 0:
            raise ValueError(f"delay: must be >= 0, got {self.delay}")
        if not 1 <= self.max_hedges <= 4:
            raise ValueError(f"max_hedges: must be 1..4, got {self.max_hedges}")
