"""Outlier ejection on a fake clock with scripted endpoints and a scripted RNG."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from mesh.policy import EjectionPolicy
from mesh.resilience.ejection import EjectionState, OutlierDetector
from mesh.testing import FakeClock


@dataclass(eq=False)
class Endpoint:
    name: str
    ejection: EjectionState = field(init=False)

    def __post_init__(self) -> None:
        self.ejection = EjectionState(self.name)


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:50051") for i in range(1, n + 1)]


def detector(clock: FakeClock, rng: float = 0.5, **policy: Any) -> OutlierDetector:
    """rng 0.5 means no jitter: the factor is 1 + jitter * (2 * rng - 1)."""
    return OutlierDetector(EjectionPolicy(**policy), clock, lambda: rng, service="catalog")


def ejection_end(state: EjectionState) -> float:
    assert state.ejected_until is not None
    return state.ejected_until


def fail(d: OutlierDetector, endpoint: Endpoint, times: int = 5) -> None:
    for _ in range(times):
        d.on_failure(endpoint.ejection)


def names(available: Sequence[Endpoint]) -> list[str]:
    return [e.name[-7:-6] for e in available]


def test_nothing_ejected_returns_the_candidates_themselves() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    d.on_success(eps[0].ejection)
    fail(d, eps[1], 4)
    assert d.available(eps) is eps


def test_ejected_after_n_consecutive_failures_at_once() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(4)
    fail(d, eps[1], 4)
    assert d.available(eps) is eps
    d.on_failure(eps[1].ejection)
    assert names(d.available(eps)) == ["1", "3", "4"]
    assert eps[1].ejection.ejected(clock.now)


def test_a_success_in_between_resets_the_count() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(4)
    fail(d, eps[0], 4)
    d.on_success(eps[0].ejection)
    fail(d, eps[0], 4)
    assert d.available(eps) is eps
    d.on_failure(eps[0].ejection)
    assert eps[0] not in d.available(eps)


def eject_and_fail_probes(
    d: OutlierDetector, clock: FakeClock, state: EjectionState
) -> list[float]:
    """Eject, then let every probe fail: the successive ejection times."""
    for _ in range(d.policy.consecutive_failures):
        d.on_failure(state)
    durations = []
    for _ in range(12):
        assert state.ejected_until is not None
        durations.append(round(state.ejected_until - clock.now, 6))
        clock.now = ejection_end(state)
        assert d.on_picked(state)
        d.on_failure(state)
    return durations


@pytest.mark.parametrize(("rng", "factor"), [(0.5, 1.0), (0.0, 0.9), (0.75, 1.05)])
def test_ejection_times_grow_then_cap_with_jitter(rng: float, factor: float) -> None:
    clock = FakeClock(1000.0)
    d = detector(clock, rng=rng)
    durations = eject_and_fail_probes(d, clock, EjectionState("a"))
    expected = [min(30.0 * n, 300.0) * factor for n in range(1, 13)]
    assert durations == pytest.approx(expected)


def test_times_ejected_decays_by_one_per_base_time_of_health() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    state = EjectionState("a")
    for _ in range(5):
        d.on_failure(state)
    for _ in range(2):  # two failed probes: ejected 3 times
        clock.now = ejection_end(state)
        d.on_picked(state)
        d.on_failure(state)
    clock.now = ejection_end(state)
    assert d.on_picked(state)
    d.on_success(state)
    assert state.ejected_until is None
    clock.now += 65.0  # two base times healthy: 3 -> 1
    for _ in range(5):
        d.on_failure(state)
    assert state.times_ejected == 2
    assert state.ejected_until == pytest.approx(clock.now + 60.0)


def test_at_most_max_percent_ejected_the_soonest_back_are_let_back() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(4)
    fail(d, eps[0])
    clock.now += 1
    fail(d, eps[1])
    clock.now += 1
    fail(d, eps[2])
    # 50 % of 4: two may be out. eps[0]'s ejection ends first, so it is let back.
    assert names(d.available(eps)) == ["4", "1"]
    assert eps[0].ejection.ejected(clock.now)  # still ejected: let back, not forgiven


def test_a_small_percent_still_ejects_one_and_zero_ejects_none() -> None:
    clock = FakeClock(1000.0)
    eps = endpoints(4)
    d = detector(clock, max_ejection_percent=10.0)
    fail(d, eps[0])
    fail(d, eps[1])
    assert len(d.available(eps)) == 3
    none = detector(clock, max_ejection_percent=0.0)
    assert len(none.available(eps)) == 4


def test_at_least_one_endpoint_is_always_available() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock, max_ejection_percent=100.0)
    eps = endpoints(2)
    fail(d, eps[0])
    clock.now += 1
    fail(d, eps[1])
    assert names(d.available(eps)) == ["1"]
    alone = endpoints(1)
    fail(d, alone[0])
    assert d.available(alone) == alone


def test_half_open_admits_a_single_probe() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    fail(d, eps[0])
    assert eps[0] not in d.available(eps)
    clock.now = ejection_end(eps[0].ejection)
    assert eps[0] in d.available(eps)  # half-open: a probe may go
    assert d.on_picked(eps[0].ejection)  # this call is the probe
    assert eps[0] not in d.available(eps)  # a second, concurrent call may not
    assert not d.on_picked(eps[0].ejection)
    assert not d.on_picked(eps[1].ejection)  # healthy endpoints have no probe to claim


def test_a_successful_probe_brings_the_endpoint_back() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    fail(d, eps[0])
    clock.now = ejection_end(eps[0].ejection)
    assert d.on_picked(eps[0].ejection)
    d.on_success(eps[0].ejection)
    assert d.available(eps) is eps
    assert eps[0].ejection.consecutive_failures == 0


def test_a_failed_probe_ejects_again_for_longer() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    fail(d, eps[0])
    clock.now = ejection_end(eps[0].ejection)
    d.on_picked(eps[0].ejection)
    d.on_failure(eps[0].ejection)  # one failure is enough
    assert eps[0] not in d.available(eps)
    assert eps[0].ejection.ejected_until == pytest.approx(clock.now + 60.0)


def test_a_probe_without_verdict_frees_the_endpoint_for_another() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    fail(d, eps[0])
    clock.now = ejection_end(eps[0].ejection)
    d.on_picked(eps[0].ejection)
    d.on_neutral(eps[0].ejection)  # cancelled by its caller
    assert eps[0] in d.available(eps)
    assert d.on_picked(eps[0].ejection)


def test_an_unreported_probe_is_presumed_lost_after_the_probe_timeout() -> None:
    clock = FakeClock(1000.0)
    d = OutlierDetector(EjectionPolicy(), clock, lambda: 0.5, probe_timeout=10.0)
    eps = endpoints(3)
    fail(d, eps[0])
    clock.now = ejection_end(eps[0].ejection)
    d.on_picked(eps[0].ejection)
    clock.now += 9.9
    assert eps[0] not in d.available(eps)
    clock.now += 0.1
    assert eps[0] in d.available(eps)
    assert d.on_picked(eps[0].ejection)


def test_results_of_calls_from_before_the_ejection_are_ignored() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    fail(d, eps[0])
    until = eps[0].ejection.ejected_until
    d.on_success(eps[0].ejection)
    fail(d, eps[0], 10)
    assert eps[0].ejection.ejected_until == until
    assert eps[0].ejection.times_ejected == 1


def test_probe_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutlierDetector(EjectionPolicy(), FakeClock(1000.0), lambda: 0.5, probe_timeout=0)


def test_a_lost_connection_ejects_at_once() -> None:
    clock = FakeClock(1000.0)
    d = detector(clock)
    eps = endpoints(3)
    d.eject_now(eps[0].ejection)
    assert eps[0] not in d.available(eps)
    assert ejection_end(eps[0].ejection) == pytest.approx(clock.now + 30.0)
    d.eject_now(eps[0].ejection)  # already out: no longer for it
    assert ejection_end(eps[0].ejection) == pytest.approx(clock.now + 30.0)
    clock.now = ejection_end(eps[0].ejection)
    assert d.on_picked(eps[0].ejection)
    d.eject_now(eps[0].ejection)  # the probe lost its connection: out again, for longer
    assert ejection_end(eps[0].ejection) == pytest.approx(clock.now + 60.0)
