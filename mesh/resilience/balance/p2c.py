"""Power of two choices: pick two endpoints at random, send the call to the cheaper one.

Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (IEEE TPDS, 2001):
with two random choices instead of one, the maximum load falls from log n / log log n to
log log n / log 2, an exponential improvement, at the price of one more look. Unlike
"least loaded of all", it needs no sorting and no global view, and it does not make every
client stampede the same momentarily-best endpoint (herding), because each pick only sees two.
Finagle (`Balancers.p2cPeakEwma`), Linkerd and tower (`balance::p2c`) pair it with the
peak-EWMA load of load.py, which is what this module does: a pick is two RNG draws and two
`cost()` reads, O(1) whatever the number of endpoints.

`exclude` is the endpoint the previous attempt of the same call failed on: a retry goes
elsewhere when there is anywhere else to go, as Envoy's `previous_hosts` retry host predicate
does (gRPC's retry design, gRFC A6, merely re-runs the LB pick, which may choose the same one).

Why we write it ourselves: no Python library offers P2C over peak-EWMA, and grpcio has no
load-balancing-policy API to plug one into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from mesh.resilience.balance.load import EndpointLoad


class HasLoad(Protocol):
    """Anything P2C can pick: it carries its EndpointLoad."""

    @property
    def load(self) -> EndpointLoad: ...


L = TypeVar("L", bound=HasLoad)


class PowerOfTwoChoices:
    """Pick the cheaper of two distinct, uniformly drawn candidates."""

    __slots__ = ("_rng",)

    def __init__(self, rng: Callable[[], float]) -> None:
        """`rng()` returns a float in [0, 1), like random.random."""
        self._rng = rng

    def pick(self, candidates: Sequence[L], now: float, exclude: L | None = None) -> L | None:
        """The cheaper of two random candidates at `now`; `exclude` (matched by identity)
        only if it is the sole candidate."""
        n = len(candidates)
        if n < 2:
            return candidates[0] if n else None
        skip = n  # index of `exclude` in candidates; n when absent
        if exclude is not None:
            for index in range(n):
                if candidates[index] is exclude:
                    skip = index
                    break
            if skip < n:
                if n == 2:
                    return candidates[1 - skip]
                n -= 1
        rng = self._rng
        # Two distinct indices among n: the second is drawn among the n - 1 others. With
        # rng() < 1, int(rng() * n) < n holds exactly in floating point for any n < 2**53.
        first = int(rng() * n)
        second = int(rng() * (n - 1))
        if second >= first:
            second += 1
        if first >= skip:
            first += 1
        if second >= skip:
            second += 1
        a = candidates[first]
        b = candidates[second]
        return a if a.load.cost(now) <= b.load.cost(now) else b
