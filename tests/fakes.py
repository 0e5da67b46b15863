"""Fakes for policy tests: a clock that moves only when told to."""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock for tests: `clock()` reads it; `advance()` and `sleep()` move it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """An asyncio.sleep stand-in: records the wait, moves the clock, yields once."""
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
