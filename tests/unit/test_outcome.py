"""The outcome classifier: every status code's outcome by default, when a request certainly
never reached the server, and classifiers as values that compose (Finagle's `orElse`)."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc import aio

from mesh.core.outcome import (
    DEFAULT,
    FAILURE_CODES,
    PRESETS,
    RETRY_ON_ABORTED,
    RETRYABLE_FAILURE,
    Classified,
    Classifier,
    Outcome,
    classify,
    classify_error,
)

C = grpc.StatusCode

EXPECTED = {
    C.OK: Outcome.SUCCESS,
    C.UNAVAILABLE: Outcome.FAILURE,
    C.DEADLINE_EXCEEDED: Outcome.FAILURE,
    C.INTERNAL: Outcome.FAILURE,
    C.UNKNOWN: Outcome.FAILURE,
    C.RESOURCE_EXHAUSTED: Outcome.FAILURE,
    C.DATA_LOSS: Outcome.FAILURE,
    C.INVALID_ARGUMENT: Outcome.CALLER_ERROR,
    C.NOT_FOUND: Outcome.CALLER_ERROR,
    C.ALREADY_EXISTS: Outcome.CALLER_ERROR,
    C.FAILED_PRECONDITION: Outcome.CALLER_ERROR,
    C.PERMISSION_DENIED: Outcome.CALLER_ERROR,
    C.UNAUTHENTICATED: Outcome.CALLER_ERROR,
    C.OUT_OF_RANGE: Outcome.CALLER_ERROR,
    C.UNIMPLEMENTED: Outcome.CALLER_ERROR,
    C.CANCELLED: Outcome.NEUTRAL,
    C.ABORTED: Outcome.NEUTRAL,
}


def test_every_status_code_is_classified() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode)


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_code_maps_to_its_outcome(code: grpc.StatusCode) -> None:
    result = classify(code)
    assert result == Classified(code, EXPECTED[code], reached_server=True)
    assert result.is_failure is (EXPECTED[code] is Outcome.FAILURE)


def test_failure_codes_are_exactly_the_failures() -> None:
    assert {c for c, o in EXPECTED.items() if o is Outcome.FAILURE} == FAILURE_CODES


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_not_sent_never_reached_the_server(code: grpc.StatusCode) -> None:
    result = classify(code, "anything at all", sent=False)
    assert result.reached_server is False
    assert result.outcome is EXPECTED[code]


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: Connection refused",
        "connections to all backends failing; last error: UNAVAILABLE",
        "Failed to connect to remote host: No route to host",
        "connect: Connection refused (111)",
        "No address added out of total 1 resolved",
        "errors resolving nosuchhost.invalid:80: Domain name not found",
        "DNS resolution failed for nosuchhost.invalid",
    ],
)
def test_unavailable_without_a_connection_never_reached(details: str) -> None:
    result = classify(C.UNAVAILABLE, details)
    assert result.reached_server is False
    assert result.connection_lost is True


@pytest.mark.parametrize(
    "details",
    ["Socket closed", "recvmsg:Connection reset by peer", "Broken pipe", "Cancelling all calls"],
)
def test_a_broken_connection_may_have_reached_and_is_lost(details: str) -> None:
    result = classify(C.UNAVAILABLE, details)
    assert result.reached_server is True
    assert result.connection_lost is True


@pytest.mark.parametrize("details", [None, "", "GOAWAY received", "overloaded, try later"])
def test_other_unavailable_may_have_reached(details: str | None) -> None:
    result = classify(C.UNAVAILABLE, details)
    assert result.reached_server is True
    assert result.connection_lost is False


def test_mesh_made_failures_lost_no_connection() -> None:
    assert classify(C.UNAVAILABLE, "Connection refused", sent=False).connection_lost is False


def test_connection_wording_on_other_codes_may_have_reached() -> None:
    for details in ("failed to connect to all addresses", "Socket closed"):
        assert classify(C.INTERNAL, details) == Classified(C.INTERNAL, Outcome.FAILURE, True)
        assert classify(C.DEADLINE_EXCEEDED, details).reached_server is True


def test_classify_returns_shared_values() -> None:
    assert classify(C.UNAVAILABLE) is classify(C.UNAVAILABLE)
    assert classify(C.UNAVAILABLE, "No address") is classify(C.UNAVAILABLE, "Connection refused")


def test_classify_error_of_an_aio_error() -> None:
    error = aio.AioRpcError(C.NOT_FOUND, aio.Metadata(), aio.Metadata(), "no item 'x'")
    assert classify_error(error) == Classified(C.NOT_FOUND, Outcome.CALLER_ERROR, True)
    assert classify_error(error, sent=False).reached_server is False


async def test_a_real_refused_connection_never_reached() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary("/test.Echo/Unary")(b"", timeout=5)
    result = classify_error(caught.value)
    assert result.code is C.UNAVAILABLE
    assert result.reached_server is False
    assert result.connection_lost is True


# -- the classifier as a value ---------------------------------------------------------------


def test_the_default_classifier_is_the_table() -> None:
    assert {code: DEFAULT.classify(code).outcome for code in C} == EXPECTED
    assert DEFAULT.failure_codes == FAILURE_CODES
    assert not any(DEFAULT.classify(code).retryable for code in C)


def test_a_rule_changes_only_the_codes_it_names() -> None:
    aborted_fails = Classifier.of({C.ABORTED: Outcome.FAILURE})
    assert aborted_fails.classify(C.ABORTED) == Classified(C.ABORTED, Outcome.FAILURE, True)
    assert C.ABORTED in aborted_fails.failure_codes
    for code in set(C) - {C.ABORTED}:
        assert aborted_fails.classify(code) == DEFAULT.classify(code)


def test_or_else_the_first_rules_win_the_second_cover_the_rest() -> None:
    method = Classifier.of({C.NOT_FOUND: Outcome.NEUTRAL})
    service = Classifier.of({C.NOT_FOUND: Outcome.FAILURE, C.ABORTED: RETRYABLE_FAILURE})
    both = method.or_else(service)
    assert both.classify(C.NOT_FOUND).outcome is Outcome.NEUTRAL
    assert both.classify(C.ABORTED).retryable is True
    assert both.classify(C.INTERNAL) == DEFAULT.classify(C.INTERNAL)
    assert both == method.or_else(service)
    assert "NOT_FOUND=neutral" in repr(both) and "ABORTED=retryable_failure" in repr(both)


def test_a_retryable_failure_keeps_the_transport_facts() -> None:
    lenient = Classifier.of({C.UNAVAILABLE: RETRYABLE_FAILURE})
    never = lenient.classify(C.UNAVAILABLE, "failed to connect to all addresses")
    assert (never.reached_server, never.connection_lost, never.retryable) == (False, True, True)
    assert lenient.classify(C.UNAVAILABLE, "Connection reset") is lenient.classify(
        C.UNAVAILABLE, "Socket closed"
    )


def test_presets() -> None:
    assert PRESETS["default"] is DEFAULT
    assert RETRY_ON_ABORTED.classify(C.ABORTED).retryable is True
    assert RETRY_ON_ABORTED.classify(C.ABORTED).outcome is Outcome.FAILURE


def test_ok_is_always_a_success() -> None:
    with pytest.raises(ValueError, match="OK is always success"):
        Classifier.of({C.OK: Outcome.FAILURE})
