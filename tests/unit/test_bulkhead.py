"""The bulkhead: a fail-fast cap on calls in flight."""

from __future__ import annotations

import pytest

from mesh.resilience.bulkhead import ConcurrencyLimit


def test_admits_up_to_the_limit_then_refuses() -> None:
    limit = ConcurrencyLimit(3)
    assert [limit.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert limit.in_flight == 3
    limit.release()
    assert limit.in_flight == 2
    assert limit.try_acquire()
    assert not limit.try_acquire()


def test_a_refusal_takes_nothing() -> None:
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    for _ in range(5):
        assert not limit.try_acquire()
    limit.release()
    assert limit.in_flight == 0


def test_release_never_goes_negative() -> None:
    limit = ConcurrencyLimit(2)
    with pytest.raises(RuntimeError):
        limit.release()
    assert limit.try_acquire()
    limit.release()
    with pytest.raises(RuntimeError):
        limit.release()
    assert limit.in_flight == 0


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)
