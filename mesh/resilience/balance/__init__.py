"""The balancer layer: which endpoint a call (or a retry) goes to.

    load.py         EndpointLoad        peak-EWMA latency x outstanding calls, with slow start
    p2c.py          PowerOfTwoChoices   the cheaper of two random endpoints (the default)
    round_robin.py  RoundRobin          each in turn, load-blind (baseline)
    latency.py      RecentLatencies     recent latency quantiles, for the hedging delay

A balancer only picks among the candidates it is given: outlier ejection
(mesh/resilience/ejection.py) has already removed the ejected ones, and discovery never
reaches this layer. Picking is pure logic with the time passed in, so tests drive it with a
fake clock and a seeded RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from mesh.resilience.balance.latency import RecentLatencies
from mesh.resilience.balance.load import EndpointLoad
from mesh.resilience.balance.p2c import HasLoad, PowerOfTwoChoices
from mesh.resilience.balance.round_robin import RoundRobin

T = TypeVar("T")


class Balancer(Protocol[T]):
    """Picks one of `candidates` at `now`, avoiding `exclude` when there is a choice."""

    def pick(self, candidates: Sequence[T], now: float, exclude: T | None = None) -> T | None: ...


__all__ = [
    "Balancer",
    "EndpointLoad",
    "HasLoad",
    "PowerOfTwoChoices",
    "RecentLatencies",
    "RoundRobin",
]
