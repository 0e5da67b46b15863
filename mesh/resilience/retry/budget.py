"""A retry budget: retries (and hedges) as a share of recent requests, as Finagle and Linkerd do.

Why a budget and not only max_attempts: during an outage every call fails, and with
max_attempts=3 every call is sent three times; the retries triple the load on a service that
is already failing, and keep it down (a retry storm, worse at every hop of a call chain).
A budget lets retries mask the occasional failure but caps them, service-wide, at a fixed
share of the requests, so a broken dependency sees at most (1 + ratio) times its normal load.
A floor keeps retries possible for services that get few requests.

The arithmetic (Finagle's RetryBudget, with percentCanRetry = ratio), over the last `ttl`
seconds:

    balance = min_retries_per_second * ttl + ratio * deposits - withdrawals

`deposit()` is called once for every original request; `try_withdraw()` once for every retry
or hedge, and succeeds (counting a withdrawal) when balance >= 1. At a steady 100 requests/s
with ratio 0.2, floor 10/s and ttl 10 s, that is 100 + 200 = 300 retries per 10 s: 20% of the
requests plus the floor. With no requests at all, 100 retries per 10 s still go through.

Deposits and withdrawals are counted in `buckets` (10) slots of ttl/buckets seconds each, on
an injected clock, with running totals: every operation is O(1) amortised (a slot is cleared
once as the window moves past it). A count expires between ttl - ttl/buckets and ttl seconds
after it was made. Not thread-safe: one budget belongs to one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """Retries and hedges allowed: `ratio` of requests plus a floor, over `ttl` seconds."""

    ratio: float = 0.2
    min_retries_per_second: float = 10
    ttl: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < float("inf"):
            raise ValueError(f"ratio: must be >= 0, got {self.ratio}")
        if not 0 <= self.min_retries_per_second < float("inf"):
            raise ValueError(
                f"min_retries_per_second: must be >= 0, got {self.min_retries_per_second}"
            )
        if not 1 <= self.ttl <= 60:
            raise ValueError(f"ttl: must be 1..60 seconds (as Finagle's), got {self.ttl}")


class RetryBudget:
    """The retry budget of one service (or one channel), per `BudgetPolicy`."""

    __slots__ = (
        "_clock",
        "_deposited",
        "_deposits",
        "_ratio",
        "_reserve",
        "_slot",
        "_width",
        "_withdrawals",
        "_withdrawn",
        "policy",
    )

    def __init__(
        self,
        policy: BudgetPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        buckets: int = 10,
    ) -> None:
        if buckets < 1:
            raise ValueError(f"buckets: must be >= 1, got {buckets}")
        self.policy = policy
        self._clock = clock
        self._ratio = policy.ratio
        self._reserve = policy.min_retries_per_second * policy.ttl
        self._width = policy.ttl / buckets
        self._deposits = [0] * buckets
        self._withdrawals = [0] * buckets
        self._deposited = 0
        self._withdrawn = 0
        self._slot = int(clock() // self._width)

    def _advance(self) -> int:
        """Expire the slots the window has moved past; the ring position of now's slot."""
        slot = int(self._clock() // self._width)
        size = len(self._deposits)
        behind = slot - self._slot
        if behind > 0:
            deposits, withdrawals = self._deposits, self._withdrawals
            for step in range(1, min(behind, size) + 1):
                pos = (self._slot + step) % size
                self._deposited -= deposits[pos]
                self._withdrawn -= withdrawals[pos]
                deposits[pos] = withdrawals[pos] = 0
            self._slot = slot
        return self._slot % size

    def deposit(self) -> None:
        """Count an original request."""
        pos = self._advance()
        self._deposits[pos] += 1
        self._deposited += 1

    def try_withdraw(self) -> bool:
        """Take one retry (or hedge) from the budget; False when it is empty."""
        pos = self._advance()
        if self._reserve + self._ratio * self._deposited - self._withdrawn < 1.0:
            return False
        self._withdrawals[pos] += 1
        self._withdrawn += 1
        return True

    @property
    def balance(self) -> float:
        """Retries the budget would allow now (may be fractional)."""
        self._advance()
        return self._reserve + self._ratio * self._deposited - self._withdrawn

    def __repr__(self) -> str:
        return f"RetryBudget(balance={self.balance:.1f}, {self.policy})"
