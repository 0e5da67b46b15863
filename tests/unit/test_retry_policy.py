"""RetryPolicy and RetryState: every rule of whether and when to retry, server pushback,
and idempotency read from the proto descriptors. No clock, no sleeps: a scripted RNG."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from foodmesh.catalog.v1 import catalog_pb2
from foodmesh.orders.v1 import orders_pb2
from mesh.core.backoff import ExponentialBackoff
from mesh.core.outcome import RETRY_ON_ABORTED, classify
from mesh.resilience.retry import (
    NO_RETRY,
    PUSHBACK_KEY,
    RetryPolicy,
    RetryState,
    idempotent_from_descriptor,
    method_descriptor_for,
    method_is_idempotent,
    parse_pushback,
)

C = grpc.StatusCode
UNAVAILABLE = classify(C.UNAVAILABLE)
NEVER_CONNECTED = classify(C.UNAVAILABLE, "failed to connect to all addresses")


def half() -> float:
    return 0.5


# -- the policy value ------------------------------------------------------------------------


def test_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.retryable_codes == frozenset({C.UNAVAILABLE})
    assert policy.backoff == ExponentialBackoff(0.025, 0.25)
    assert policy.per_attempt_timeout is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts: must be 1..5, got 0"),
        ({"max_attempts": 6}, "max_attempts: must be 1..5, got 6"),
        ({"retryable_codes": frozenset({C.NOT_FOUND})}, "retryable_codes: NOT_FOUND"),
        ({"retryable_codes": frozenset({C.CANCELLED})}, "retryable_codes: CANCELLED"),
        ({"retryable_codes": frozenset({C.OK})}, "retryable_codes: OK"),
        ({"per_attempt_timeout": 0.0}, "per_attempt_timeout: must be > 0"),
    ],
)
def test_invalid_policies_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retryable_codes_may_be_given_as_any_set() -> None:
    codes = {C.UNAVAILABLE, C.INTERNAL}
    assert RetryPolicy(retryable_codes=codes).retryable_codes == frozenset(codes)  # type: ignore[arg-type]


# -- the state -------------------------------------------------------------------------------


def test_state_is_immutable_and_increment_returns_a_new_one() -> None:
    state = RetryPolicy().start(idempotent=True)
    assert (state.attempts, state.may_retry) == (0, True)
    assert state.delay_for_next(half) == 0.0
    after = state.increment(UNAVAILABLE)
    assert after is not state
    assert (state.attempts, after.attempts) == (0, 1)
    assert after.last is UNAVAILABLE


def test_never_past_max_attempts() -> None:
    state = RetryPolicy(max_attempts=3).start(idempotent=True)
    decisions = []
    for _ in range(3):
        state = state.increment(UNAVAILABLE)
        decisions.append(state.may_retry)
    assert decisions == [True, True, False]
    assert "all 3 attempts" in state.reason
    with pytest.raises(ValueError, match="no further attempt"):
        state.delay_for_next(half)


def test_one_attempt_means_no_retry() -> None:
    assert not RetryPolicy(max_attempts=1).start(idempotent=True).increment(UNAVAILABLE).may_retry


@pytest.mark.parametrize(
    "code", [C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT, C.UNIMPLEMENTED, C.CANCELLED, C.ABORTED]
)
def test_success_caller_errors_and_neutral_are_never_retried(code: grpc.StatusCode) -> None:
    policy = RetryPolicy(retryable_codes=frozenset({C.UNAVAILABLE, C.INTERNAL}))
    for classified in (classify(code), classify(code, sent=False)):
        assert not policy.start(idempotent=True).increment(classified).may_retry


def test_code_not_listed_is_not_retried() -> None:
    state = RetryPolicy().start(idempotent=True).increment(classify(C.INTERNAL))
    assert not state.may_retry
    assert "INTERNAL is not a retryable code" in state.reason
    listed = RetryPolicy(retryable_codes=frozenset({C.UNAVAILABLE, C.INTERNAL}))
    assert listed.start(idempotent=True).increment(classify(C.INTERNAL)).may_retry


def test_a_classifiers_retryable_failure_is_retried_without_being_listed() -> None:
    aborted = RETRY_ON_ABORTED.classify(C.ABORTED)
    state = RetryPolicy().start(idempotent=True).increment(aborted)
    assert state.may_retry and state.reason == "retryable ABORTED"
    # the other rules still hold: idempotency, and the attempt cap
    assert not RetryPolicy().start(idempotent=False).increment(aborted).may_retry
    assert not RetryPolicy(max_attempts=1).start(idempotent=True).increment(aborted).may_retry


def test_may_have_reached_is_retried_only_when_idempotent() -> None:
    policy = RetryPolicy()
    assert policy.start(idempotent=True).increment(UNAVAILABLE).may_retry
    refused = policy.start(idempotent=False).increment(UNAVAILABLE)
    assert not refused.may_retry
    assert "not idempotent" in refused.reason


def test_never_reached_unavailable_is_always_retried() -> None:
    not_listed = RetryPolicy(retryable_codes=frozenset({C.INTERNAL}))
    for classified in (NEVER_CONNECTED, classify(C.UNAVAILABLE, "breaker open", sent=False)):
        assert not_listed.start(idempotent=False).increment(classified).may_retry
    # ... but still never past max_attempts
    state = RetryPolicy(max_attempts=2).start(idempotent=False)
    assert not state.increment(NEVER_CONNECTED).increment(NEVER_CONNECTED).may_retry


def test_never_reached_other_codes_follow_the_code_rules_without_idempotency() -> None:
    listed = RetryPolicy(retryable_codes=frozenset({C.UNAVAILABLE, C.INTERNAL}))
    internal_not_sent = classify(C.INTERNAL, sent=False)
    assert listed.start(idempotent=False).increment(internal_not_sent).may_retry
    assert not RetryPolicy().start(idempotent=False).increment(internal_not_sent).may_retry


def test_resource_exhausted_only_with_valid_pushback() -> None:
    policy = RetryPolicy(retryable_codes=frozenset({C.UNAVAILABLE, C.RESOURCE_EXHAUSTED}))
    exhausted = classify(C.RESOURCE_EXHAUSTED)
    without = policy.start(idempotent=True).increment(exhausted)
    assert not without.may_retry
    assert "pushback" in without.reason
    assert not policy.start(idempotent=True).increment(exhausted, NO_RETRY).may_retry
    pushed = policy.start(idempotent=True).increment(exhausted, 0.2)
    assert pushed.may_retry
    assert pushed.delay_for_next(half) == 0.2
    # not listed: not retried even with pushback
    assert not RetryPolicy().start(idempotent=True).increment(exhausted, 0.2).may_retry


def test_pushback_overrides_backoff_and_forbids_retries() -> None:
    state = RetryPolicy().start(idempotent=True)
    assert state.increment(UNAVAILABLE, 1.5).delay_for_next(half) == 1.5
    assert state.increment(UNAVAILABLE, 0.0).delay_for_next(half) == 0.0
    forbidden = state.increment(UNAVAILABLE, NO_RETRY)
    assert not forbidden.may_retry
    assert "pushback" in forbidden.reason


def test_backoff_delay_grows_with_attempts_and_uses_the_rng() -> None:
    state = RetryPolicy(max_attempts=5).start(idempotent=True)
    delays = []
    for _ in range(4):
        state = state.increment(UNAVAILABLE)
        delays.append(state.delay_for_next(half))
    # uniform in [0, min(0.25, 0.025 * 2**(n-1))], drawn at the middle
    assert delays == pytest.approx([0.0125, 0.025, 0.05, 0.1])
    assert state.increment(UNAVAILABLE, None).pushback is None


def test_pushback_is_for_the_next_attempt_only() -> None:
    state = RetryPolicy().start(idempotent=True).increment(UNAVAILABLE, 2.0)
    assert state.increment(UNAVAILABLE).delay_for_next(half) == pytest.approx(0.025)


def test_attempt_timeout() -> None:
    unlimited = RetryPolicy().start(idempotent=True)
    assert unlimited.attempt_timeout(3.0) == 3.0
    limited = RetryPolicy(per_attempt_timeout=0.5).start(idempotent=True)
    assert limited.attempt_timeout(3.0) == 0.5
    assert limited.attempt_timeout(0.2) == 0.2


def test_state_can_be_built_directly() -> None:
    assert RetryState(RetryPolicy(), idempotent=False).may_retry


# -- pushback parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250", 0.25),
        (b"250", 0.25),
        ("0", 0.0),
        ("2147483647", 2147483.647),
        ("-1", NO_RETRY),
        (b"-500", NO_RETRY),
        ("", NO_RETRY),
        ("1.5", NO_RETRY),
        ("+5", NO_RETRY),
        (" 5", NO_RETRY),
        ("ten", NO_RETRY),
        ("2147483648", NO_RETRY),
        (b"\xff", NO_RETRY),
    ],
)
def test_parse_pushback(value: str | bytes, expected: object) -> None:
    assert parse_pushback([("other", "x"), (PUSHBACK_KEY, value)]) == expected


def test_pushback_absent() -> None:
    assert parse_pushback(None) is None
    assert parse_pushback([]) is None
    assert parse_pushback(aio.Metadata(("grpc-retry-pushback", "5"))) is None


def test_pushback_from_aio_metadata_first_value_counts() -> None:
    metadata = aio.Metadata((PUSHBACK_KEY, "100"), (PUSHBACK_KEY, "-1"))
    assert parse_pushback(metadata) == 0.1


# -- idempotency from descriptors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("full_method", "idempotent"),
    [
        ("/foodmesh.catalog.v1.CatalogService/GetItem", True),
        ("/foodmesh.catalog.v1.CatalogService/ListItems", True),
        ("/foodmesh.orders.v1.OrderService/GetOrder", True),
        ("/foodmesh.orders.v1.OrderService/PlaceOrder", False),
    ],
)
def test_idempotency_level_from_the_proto(full_method: str, idempotent: bool) -> None:
    services = {  # importing the generated modules puts their descriptors in the pool
        s.full_name: s
        for s in (
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
            orders_pb2.DESCRIPTOR.services_by_name["OrderService"],
        )
    }
    service, _, name = full_method[1:].partition("/")
    descriptor = method_descriptor_for(full_method)
    assert descriptor is services[service].methods_by_name[name]
    assert idempotent_from_descriptor(descriptor) is idempotent
    assert method_is_idempotent(full_method) is idempotent


@pytest.mark.parametrize(
    "full_method",
    [
        "/foodmesh.catalog.v1.CatalogService/NoSuchMethod",
        "/no.such.Service/Method",
        "/foodmesh.catalog.v1.CatalogService",
        "/a/b/c",
        "",
        "/",
    ],
)
def test_unknown_methods_have_no_descriptor(full_method: str) -> None:
    assert method_descriptor_for(full_method) is None
    assert method_is_idempotent(full_method) is False


def test_explicit_setting_wins_over_the_proto() -> None:
    assert method_is_idempotent("/foodmesh.orders.v1.OrderService/PlaceOrder", True) is True
    assert method_is_idempotent("/foodmesh.catalog.v1.CatalogService/GetItem", False) is False
    assert method_is_idempotent("/no.such.Service/Method", True) is True
