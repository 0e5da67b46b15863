"""RecentLatencies: quantiles of the last few hundred latencies, for the hedging delay.

A hedged request is sent once the first attempt has been slower than a high quantile of
recent latencies (Dean and Barroso, "The Tail at Scale", CACM 2013: hedge after the 95th
percentile). gRPC's hedging (gRFC A6) takes a fixed delay instead, and grpcio does not
implement hedging at all, so we keep the distribution ourselves.

The window is a ring buffer of the last `capacity` samples: `add()` is one store. A quantile
needs the samples sorted; the sorted copy is cached and made again only when it has gone
stale: `resort_every` samples have been added since, or `max_age` seconds have passed with at
least one new sample. While fewer than `resort_every` samples were there at the last sort,
any new sample makes it stale (sorting a handful is cheap, and a quantile of 3 samples must
not ignore the 4th). A quantile is thus at most `resort_every` samples or `max_age` seconds
behind, which does not matter for a delay that is a rough tail estimate by nature.

Why we write it ourselves: no Python library keeps a cheap rolling quantile for a hedging
delay; statistics.quantiles() sorts on every call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RecentLatencies:
    """The last `capacity` latencies (seconds) and cached quantiles over them."""

    __slots__ = (
        "_added_since_sort",
        "_capacity",
        "_clock",
        "_max_age",
        "_next",
        "_resort_every",
        "_ring",
        "_sorted",
        "_sorted_at",
    )

    def __init__(
        self,
        capacity: int = 256,
        *,
        clock: Callable[[], float] = time.monotonic,
        resort_every: int = 32,
        max_age: float = 1.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if resort_every < 1:
            raise ValueError(f"resort_every must be >= 1, got {resort_every}")
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        self._capacity = capacity
        self._ring: list[float] = []
        self._next = 0
        self._clock = clock
        self._resort_every = min(resort_every, capacity)
        self._max_age = max_age
        self._sorted: list[float] = []
        self._sorted_at = 0.0
        self._added_since_sort = 0

    @property
    def capacity(self) -> int:
        """How many of the latest samples are kept."""
        return self._capacity

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, seconds: float) -> None:
        """Record one latency."""
        ring = self._ring
        if len(ring) < self._capacity:
            ring.append(seconds)
        else:
            ring[self._next] = seconds
            self._next = (self._next + 1) % self._capacity
        self._added_since_sort += 1

    def quantile(self, q: float) -> float | None:
        """The q-quantile (nearest rank; 0 <= q <= 1) of recent latencies; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        added = self._added_since_sort
        if added:
            stale_by_count = added >= self._resort_every or len(self._sorted) < self._resort_every
            if stale_by_count or self._clock() - self._sorted_at >= self._max_age:
                self._sorted = sorted(self._ring)
                self._sorted_at = self._clock()
                self._added_since_sort = 0
        ordered = self._sorted
        n = len(ordered)
        if not n:
            return None
        rank = math.ceil(q * n - 1e-9)  # nearest rank; the 1e-9 absorbs 0.07 * 100 = 7.000...1
        return ordered[rank - 1 if rank > 0 else 0]
