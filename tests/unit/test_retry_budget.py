"""RetryBudget's arithmetic on a fake clock:
balance = min_retries_per_second * ttl + ratio * deposits - withdrawals, over the last ttl."""

from __future__ import annotations

import pytest

from mesh.policy import BudgetPolicy
from mesh.resilience.retry import RetryBudget
from mesh.testing import FakeClock


def drain(budget: RetryBudget) -> int:
    taken = 0
    while budget.try_withdraw():
        taken += 1
    return taken


def test_floor_alone_allows_min_retries_per_second_times_ttl() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_retries_per_second=10, ttl=10.0), clock=clock)
    assert budget.balance == 100
    assert drain(budget) == 100
    assert not budget.try_withdraw()
    # over an idle period the floor comes back as the withdrawals leave the window
    clock.now += 10.0
    assert drain(budget) == 100


def test_steady_rate_allows_the_ratio_plus_the_floor() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_retries_per_second=10, ttl=10.0), clock=clock)
    for _ in range(1000):  # 100 requests/s for 10 s
        budget.deposit()
        clock.now += 0.01
    clock.now -= 0.005  # still inside the 10 s the requests came in
    assert budget.balance == pytest.approx(100 + 0.2 * 1000)
    assert drain(budget) == 300


def test_retry_storm_is_capped_at_ratio_plus_floor_per_second() -> None:
    """Every request fails and wants a retry: retries settle at 20% + 10/s."""
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_retries_per_second=10, ttl=10.0), clock=clock)
    retried_per_second = []
    for _ in range(60):
        retried = 0
        for _ in range(100):
            budget.deposit()
            retried += budget.try_withdraw()
            clock.now += 0.01
        retried_per_second.append(retried)
    # the first seconds spend the floor's reserve; afterwards 30 of 100 requests are retried
    late = retried_per_second[20:]
    assert sum(late) / len(late) == pytest.approx(30, abs=1)
    assert max(late) <= 100


def test_empty_budget_refuses_and_refusals_cost_nothing() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=0.5, min_retries_per_second=0, ttl=10.0), clock=clock)
    assert not budget.try_withdraw()
    budget.deposit()
    assert not budget.try_withdraw()  # 0.5 of a retry is not a retry
    budget.deposit()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    for _ in range(10):
        assert not budget.try_withdraw()
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw()


def test_window_slides_old_deposits_expire() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_retries_per_second=0, ttl=10.0), clock=clock)
    for _ in range(50):
        budget.deposit()
    clock.now += 5.0
    for _ in range(30):
        budget.deposit()
    assert budget.balance == 80
    clock.now += 5.0  # the first 50 are now 10 s old: gone
    assert budget.balance == 30
    clock.now += 5.0
    assert budget.balance == 0
    clock.now += 3600.0  # a long idle jump clears everything once
    assert budget.balance == 0
    budget.deposit()
    assert budget.balance == 1


def test_withdrawals_expire_with_the_window() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_retries_per_second=0, ttl=10.0), clock=clock)
    for _ in range(10):
        budget.deposit()
    assert drain(budget) == 10
    clock.now += 10.0
    for _ in range(4):
        budget.deposit()
    assert budget.balance == 4  # neither the old deposits nor the old withdrawals count


def test_bucket_granularity() -> None:
    """A count expires between ttl - ttl/buckets and ttl seconds after it was made."""
    clock = FakeClock(1000.0)  # 1000.0: the start of a 1 s bucket
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_retries_per_second=0, ttl=10.0), clock=clock)
    clock.now = 1000.5
    budget.deposit()
    clock.now = 1009.99
    assert budget.balance == 1
    clock.now = 1010.0
    assert budget.balance == 0


def test_zero_ratio_leaves_only_the_floor() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=0.0, min_retries_per_second=1, ttl=5.0), clock=clock)
    for _ in range(1000):
        budget.deposit()
    assert drain(budget) == 5


def test_bucket_count_is_validated() -> None:
    with pytest.raises(ValueError, match="buckets"):
        RetryBudget(BudgetPolicy(), buckets=0)
    assert "balance=100.0" in repr(RetryBudget(BudgetPolicy(), clock=FakeClock(1000.0)))
