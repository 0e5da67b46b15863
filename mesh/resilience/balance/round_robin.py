"""Round robin: each endpoint in turn, with the same `pick` contract as P2C.

Kept as the baseline to measure P2C against and as a policy for callers who want no
load-awareness (gRPC's own `round_robin` LB policy). It ignores load, so one slow endpoint
gets its full share of calls; P2C over peak-EWMA (p2c.py) exists because of that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundRobin:
    """The next candidate in order; `exclude` is skipped when another candidate exists."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[T], now: float, exclude: T | None = None) -> T | None:
        """The next candidate in turn (`now` is unused: round robin ignores load)."""
        n = len(candidates)
        if not n:
            return None
        index = self._next % n
        chosen = candidates[index]
        if chosen is exclude and n > 1:
            index = (index + 1) % n
            chosen = candidates[index]
        self._next = index + 1
        return chosen
