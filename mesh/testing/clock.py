"""A clock that moves only when told to, for tests of anything that takes a `clock`.

Every policy of the mesh reads time through an injected clock (`clock()` returns seconds on a
monotonic scale), so its tests need no sleeping: they advance this one. `sleep` stands in for
asyncio.sleep where code takes a sleep function (FaultInterceptor's `sleep`), moving the clock
by what it was asked to wait.
"""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock for tests: `clock()` reads it; `advance()` and `sleep()` move it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []
        """Every wait `sleep()` was asked for, in order."""

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """An asyncio.sleep stand-in: records the wait, moves the clock, yields once."""
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
