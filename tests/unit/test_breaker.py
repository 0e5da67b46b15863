"""The per-service circuit breaker and its rolling window, on a fake clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from mesh.policy import BreakerPolicy
from mesh.resilience.breaker import BreakerState, CircuitBreaker, RollingWindow
from mesh.testing import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def breaker(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    return CircuitBreaker("catalog", BreakerPolicy(**policy), clock)


def record(b: CircuitBreaker, successes: int = 0, failures: int = 0) -> None:
    for _ in range(successes):
        b.record(True)
    for _ in range(failures):
        b.record(False)


def opened(clock: FakeClock, **policy: Any) -> CircuitBreaker:
    b = breaker(clock, **policy)
    record(b, failures=b.policy.minimum_calls)
    assert b.state is OPEN
    return b


def test_stays_closed_under_minimum_calls_even_if_all_fail() -> None:
    b = breaker(FakeClock(1000.0))
    record(b, failures=19)
    assert b.state is CLOSED
    assert b.allow()


def test_opens_when_the_failure_rate_reaches_the_threshold() -> None:
    b = breaker(FakeClock(1000.0))
    record(b, successes=10, failures=9)
    assert b.state is CLOSED
    b.record(False)  # 10 of 20
    assert b.state is OPEN


def test_stays_closed_just_below_the_threshold() -> None:
    b = breaker(FakeClock(1000.0))
    record(b, successes=11, failures=9)  # 45 %
    assert b.state is CLOSED
    record(b, successes=100, failures=99)
    assert b.state is CLOSED


def test_refuses_calls_while_open_and_ignores_late_results() -> None:
    clock = FakeClock(1000.0)
    b = opened(clock)
    assert not b.allow()
    record(b, successes=50)  # calls admitted before it opened
    assert b.state is OPEN
    clock.now += 4.99
    assert not b.allow()


def test_half_open_admits_exactly_the_probe_calls() -> None:
    clock = FakeClock(1000.0)
    b = opened(clock)
    clock.now += 5.0
    assert [b.allow() for _ in range(5)] == [True, True, True, False, False]
    assert b.state is HALF_OPEN


def test_closes_with_a_fresh_window_when_all_probes_succeed() -> None:
    clock = FakeClock(1000.0)
    b = opened(clock)
    clock.now += 5.0
    for _ in range(3):
        assert b.allow()
    record(b, successes=2)
    assert b.state is HALF_OPEN
    b.record(True)
    assert b.state is CLOSED
    record(b, failures=19)  # the failures before opening are forgotten
    assert b.state is CLOSED


def test_a_failed_probe_opens_it_again_for_the_open_time() -> None:
    clock = FakeClock(1000.0)
    b = opened(clock)
    clock.now += 5.0
    assert b.allow()
    assert b.allow()
    record(b, successes=1, failures=1)
    assert b.state is OPEN
    clock.now += 4.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()
    assert b.state is HALF_OPEN


def test_a_probe_without_verdict_gives_its_slot_back() -> None:
    clock = FakeClock(1000.0)
    b = opened(clock, half_open_calls=1)
    clock.now += 5.0
    assert b.allow()
    assert not b.allow()
    b.record_neutral()  # the probe was cancelled by its caller
    assert b.allow()
    b.record(True)
    assert b.state is CLOSED


def test_unreported_probes_give_way_to_a_new_round_after_the_open_time() -> None:
    clock = FakeClock(1000.0)
    b = opened(clock)
    clock.now += 5.0
    assert [b.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 5.0
    assert [b.allow() for _ in range(4)] == [True, True, True, False]


def test_the_window_forgets_old_failures() -> None:
    clock = FakeClock(1000.0)
    b = breaker(clock)
    record(b, failures=15)
    clock.now += 5.0
    record(b, successes=4)
    assert b.state is CLOSED  # 19 calls
    clock.now += 6.0  # the 15 failures have left the window; the 4 successes have not
    record(b, failures=15)
    assert b.state is CLOSED  # 15 of 19 calls
    b.record(False)
    assert b.state is OPEN  # 16 of 20


def test_listeners_see_every_change_in_order() -> None:
    clock = FakeClock(1000.0)
    b = breaker(clock)
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    b.add_listener(lambda service, old, new: seen.append((service, old, new)))
    record(b, failures=20)
    clock.now += 5.0
    b.allow()
    b.record(False)
    clock.now += 5.0
    for _ in range(3):
        b.allow()
    record(b, successes=3)
    assert seen == [
        ("catalog", CLOSED, OPEN),
        ("catalog", OPEN, HALF_OPEN),
        ("catalog", HALF_OPEN, OPEN),
        ("catalog", OPEN, HALF_OPEN),
        ("catalog", HALF_OPEN, CLOSED),
    ]


def test_a_failing_listener_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    b = breaker(FakeClock(1000.0))
    seen: list[BreakerState] = []

    def broken(service: str, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("listener bug")

    b.add_listener(broken)
    b.add_listener(lambda service, old, new: seen.append(new))
    record(b, failures=20)
    assert seen == [OPEN]
    assert "listener" in caplog.text


def test_state_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh.resilience.breaker")
    clock = FakeClock(1000.0)
    b = opened(clock)
    clock.now += 5.0
    for _ in range(3):
        b.allow()
    record(b, successes=3)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == logging.WARNING
    assert "'catalog' is open: 20 of 20 calls failed" in levels[0][1]
    assert levels[-1][0] == logging.INFO
    assert "'catalog' is closed" in levels[-1][1]


def test_state_is_a_str_enum() -> None:
    assert CLOSED == "closed" and OPEN == "open" and HALF_OPEN == "half_open"


# -- RollingWindow ------------------------------------------------------------------------


def test_rolling_window_totals_slide_bucket_by_bucket() -> None:
    window = RollingWindow(10.0, buckets=10)
    window.add(True, 0.5)
    window.add(False, 3.5)
    window.add(True, 9.5)
    assert (window.calls, window.failures) == (3, 2)
    window.add(False, 10.0)  # the bucket of 0.5 is reused
    assert (window.calls, window.failures) == (3, 1)
    window.add(False, 13.9)  # the bucket of 3.5 goes
    assert (window.calls, window.failures) == (3, 1)
    window.add(False, 100.0)  # a long gap empties everything
    assert (window.calls, window.failures) == (1, 0)


@pytest.mark.parametrize(("window", "buckets"), [(0.0, 10), (10.0, 0)])
def test_rolling_window_rejects_bad_settings(window: float, buckets: int) -> None:
    with pytest.raises(ValueError):
        RollingWindow(window, buckets)
