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

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, TypeVar

from mesh.resilience.balance.latency import RecentLatencies
from mesh.resilience.balance.load import EndpointLoad
from mesh.resilience.balance.p2c import HasLoad, PowerOfTwoChoices
from mesh.resilience.balance.round_robin import RoundRobin

T = TypeVar("T")


class Balancer(Protocol[T]):
    """Picks one of `candidates` at `now`, avoiding `exclude` when there is a choice."""

    def pick(self, candidates: Sequence[T], now: float, exclude: T | None = None) -> T | None: ...


BalancerName = Literal["p2c", "round_robin"]
"""The balancers a policy may name (`balancer = "p2c"`)."""
BALANCERS: tuple[BalancerName, ...] = ("p2c", "round_robin")


def new_balancer(name: BalancerName, rng: Callable[[], float]) -> PowerOfTwoChoices | RoundRobin:
    """The balancer a policy names; `rng()` returns a float in [0, 1)."""
    return RoundRobin() if name == "round_robin" else PowerOfTwoChoices(rng)


__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerName",
    "EndpointLoad",
    "HasLoad",
    "PowerOfTwoChoices",
    "RecentLatencies",
    "RoundRobin",
    "new_balancer",
]
