"""The one classifier of call outcomes: retry, breaker, balancer and metrics all ask it.

A status code means different things to different layers unless one place decides, once, what
it says about the endpoint (Finagle's ResponseClassifier plays this part). Four outcomes:

    SUCCESS        OK
    FAILURE        the endpoint's fault: it counts against the endpoint (breaker, ejection,
                   balancer) and may be retried: UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
                   UNKNOWN, RESOURCE_EXHAUSTED, DATA_LOSS
    CALLER_ERROR   the request's fault, never a failure of the endpoint and never retried:
                   INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
                   PERMISSION_DENIED, UNAUTHENTICATED, OUT_OF_RANGE, UNIMPLEMENTED
    NEUTRAL        says nothing about the endpoint: CANCELLED, ABORTED

Whether the request may have reached the server's application decides whether a method that
is not safe to repeat may be retried. `reached_server=False` is a promise, so it is given
only when certain: the mesh failed the call before sending it (`sent=False`: no endpoint,
breaker open, bulkhead full, a client-side injected abort), or grpc core reports UNAVAILABLE
because no connection was ever made (refused, unresolvable, no address). Anything else,
a reset connection included, may have reached it.

`connection_lost` says the transport to the endpoint failed: no connection could be made,
or the one in use broke (reset, closed, the server shutting down). That is stronger evidence
that the endpoint is gone than an error it answered with, and ejection acts on it at once.

`classify` is on every call's path: it is a dict lookup, plus at most two regex searches for
an UNAVAILABLE that carries details, and it returns shared, pre-built values.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import grpc
from grpc import aio

_Code = grpc.StatusCode


class Outcome(enum.Enum):
    """What a finished call says about the endpoint that served it."""

    SUCCESS = "success"
    FAILURE = "failure"
    CALLER_ERROR = "caller_error"
    NEUTRAL = "neutral"


_OUTCOMES: dict[grpc.StatusCode, Outcome] = {
    _Code.OK: Outcome.SUCCESS,
    **dict.fromkeys(
        (
            _Code.UNAVAILABLE,
            _Code.DEADLINE_EXCEEDED,
            _Code.INTERNAL,
            _Code.UNKNOWN,
            _Code.RESOURCE_EXHAUSTED,
            _Code.DATA_LOSS,
        ),
        Outcome.FAILURE,
    ),
    **dict.fromkeys(
        (
            _Code.INVALID_ARGUMENT,
            _Code.NOT_FOUND,
            _Code.ALREADY_EXISTS,
            _Code.FAILED_PRECONDITION,
            _Code.PERMISSION_DENIED,
            _Code.UNAUTHENTICATED,
            _Code.OUT_OF_RANGE,
            _Code.UNIMPLEMENTED,
        ),
        Outcome.CALLER_ERROR,
    ),
    **dict.fromkeys((_Code.CANCELLED, _Code.ABORTED), Outcome.NEUTRAL),
}

FAILURE_CODES: frozenset[grpc.StatusCode] = frozenset(
    code for code, outcome in _OUTCOMES.items() if outcome is Outcome.FAILURE
)
"""The codes that count against an endpoint (and the only ones a retry policy may list)."""

# What grpc core says when it never got a connection to send the request on.
_NEVER_CONNECTED = re.compile(
    "|".join(
        re.escape(text)
        for text in (
            "failed to connect to all addresses",
            "connection refused",
            "connections to all backends failing",
            "failed to connect to remote host",
            "no address",
            "errors resolving",
            "dns resolution failed",
        )
    ),
    re.IGNORECASE,
)
# What grpc core (or a stopping grpc server) says when a connection in use broke.
_CONNECTION_BROKE = re.compile(
    "|".join(
        re.escape(text)
        for text in (
            "socket closed",
            "connection reset",
            "broken pipe",
            "connection aborted",
            "cancelling all calls",
        )
    ),
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Classified:
    """A classified call result.

    `reached_server=False` means the request certainly never reached the server's
    application, so any method may be retried; True means it may have.
    `connection_lost=True` means the transport to the endpoint failed (see the module doc).
    """

    code: grpc.StatusCode
    outcome: Outcome
    reached_server: bool
    connection_lost: bool = False

    @property
    def is_failure(self) -> bool:
        """True when the result counts against the endpoint."""
        return self.outcome is Outcome.FAILURE


_REACHED = {code: Classified(code, outcome, True) for code, outcome in _OUTCOMES.items()}
_NOT_REACHED = {code: Classified(code, outcome, False) for code, outcome in _OUTCOMES.items()}
_NEVER_CONNECTED_RESULT = Classified(_Code.UNAVAILABLE, Outcome.FAILURE, False, True)
_CONNECTION_BROKE_RESULT = Classified(_Code.UNAVAILABLE, Outcome.FAILURE, True, True)


def classify(code: grpc.StatusCode, details: str | None = None, *, sent: bool = True) -> Classified:
    """Classify a call's status; `sent=False` for failures the mesh made before sending."""
    if not sent:
        return _NOT_REACHED[code]
    if code is _Code.UNAVAILABLE and details:
        if _NEVER_CONNECTED.search(details):
            return _NEVER_CONNECTED_RESULT
        if _CONNECTION_BROKE.search(details):
            return _CONNECTION_BROKE_RESULT
    return _REACHED[code]


def classify_error(exc: aio.AioRpcError, *, sent: bool = True) -> Classified:
    """Classify a failed grpc.aio call."""
    return classify(exc.code(), exc.details(), sent=sent)
