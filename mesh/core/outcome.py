"""The classification of call outcomes: retry, breaker, ejection and balancer all ask it.

A status code means different things to different layers unless one place decides, once, what
it says about the endpoint. That place is a value, a `Classifier`, as Finagle's
ResponseClassifier is: each method's policy holds one (mesh/policy.py), the default being the
table below, and a service or a method changes only the codes it names:

    Classifier.of({ABORTED: RETRYABLE_FAILURE})            # over the default
    Classifier.of({NOT_FOUND: Outcome.NEUTRAL}).or_else(service_classifier)

`or_else` composes (the first classifier's rules win, the other's cover the rest, the default
the remainder), and presets name the common cases (DEFAULT, RETRY_ON_ABORTED). A rule makes a
code SUCCESS, FAILURE, RETRYABLE_FAILURE (a FAILURE that the retry layer may retry whatever
the policy's `retryable_codes`: ABORTED for an optimistic-concurrency conflict, say),
CALLER_ERROR or NEUTRAL; OK is always SUCCESS. The default, four outcomes:

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

`classify` is on every failed call's path: it is a dict lookup, plus at most two regex
searches for an UNAVAILABLE that carries details, and it returns shared values that each
classifier builds once. The module functions `classify` and `classify_error` are DEFAULT's.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

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
    `retryable=True` means the classifier made the code a retryable failure: the retry layer
    need not find it in the policy's retryable_codes.
    """

    code: grpc.StatusCode
    outcome: Outcome
    reached_server: bool
    connection_lost: bool = False
    retryable: bool = False

    @property
    def is_failure(self) -> bool:
        """True when the result counts against the endpoint."""
        return self.outcome is Outcome.FAILURE


class RetryableFailure(enum.Enum):
    """A rule's verdict: FAILURE, and retryable whatever the retry policy's codes."""

    RETRYABLE_FAILURE = "retryable_failure"


RETRYABLE_FAILURE: Final = RetryableFailure.RETRYABLE_FAILURE
Verdict: TypeAlias = Outcome | RetryableFailure
"""What a classifier rule makes of a status code."""

VERDICTS: Final[Mapping[str, Verdict]] = MappingProxyType(
    {**{outcome.value: outcome for outcome in Outcome}, RETRYABLE_FAILURE.value: RETRYABLE_FAILURE}
)
"""Verdicts by the names a policy file uses ("failure", "retryable_failure", "neutral", ...)."""


@dataclass(frozen=True, slots=True, eq=False)
class Classifier:
    """Which outcome each status code is: a value, composable, with today's table as default.

    `rules` map codes to verdicts; codes it does not name fall to `fallback`, and from there
    to the default table. Built once, its answers are pre-built: classifying is a lookup.
    Two classifiers are equal when they classify every code alike.
    """

    rules: Mapping[grpc.StatusCode, Verdict]
    fallback: Classifier | None = None
    name: str = ""
    """For logs and reprs; made from the rules when not given."""
    _reached: dict[grpc.StatusCode, Classified] = field(init=False, repr=False)
    _not_reached: dict[grpc.StatusCode, Classified] = field(init=False, repr=False)
    _never_connected: Classified = field(init=False, repr=False)
    _connection_broke: Classified = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for code, verdict in self.rules.items():
            if code is _Code.OK and verdict is not Outcome.SUCCESS:
                raise ValueError(f"OK is always success, got {_verdict_name(verdict)}")
            if not isinstance(verdict, Outcome | RetryableFailure):
                raise ValueError(f"{code.name}: not an outcome: {verdict!r}")
        rules = MappingProxyType(dict(self.rules))
        table = dict(self.fallback.table() if self.fallback is not None else _DEFAULT_VERDICTS)
        table.update(rules)
        reached = {code: _classified(code, v, True) for code, v in table.items()}
        unavailable = reached[_Code.UNAVAILABLE]
        for name, value in (
            ("rules", rules),
            ("name", self.name or _describe(rules, self.fallback)),
            ("_reached", reached),
            ("_not_reached", {code: _classified(code, v, False) for code, v in table.items()}),
            ("_never_connected", _with_connection(unavailable, reached_server=False)),
            ("_connection_broke", _with_connection(unavailable, reached_server=True)),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, rules: Mapping[grpc.StatusCode, Verdict], *, name: str | None = None) -> Classifier:
        """A classifier of these rules over the default table."""
        return cls(rules, name=name or "")

    def or_else(self, other: Classifier) -> Classifier:
        """This classifier's rules, then `other`'s for the codes these do not name."""
        return Classifier(self.rules, fallback=other)

    def table(self) -> dict[grpc.StatusCode, Verdict]:
        """The verdict of every status code."""
        return {code: _verdict(c) for code, c in self._reached.items()}

    @property
    def failure_codes(self) -> frozenset[grpc.StatusCode]:
        """The codes that count against an endpoint."""
        return frozenset(c for c, r in self._reached.items() if r.outcome is Outcome.FAILURE)

    def classify(
        self, code: grpc.StatusCode, details: str | None = None, *, sent: bool = True
    ) -> Classified:
        """Classify a call's status; `sent=False` for failures the mesh made before sending."""
        if not sent:
            return self._not_reached[code]
        result = self._reached[code]
        if code is _Code.UNAVAILABLE and details:
            if _NEVER_CONNECTED.search(details):
                return self._never_connected
            if _CONNECTION_BROKE.search(details):
                return self._connection_broke
        return result

    def classify_error(self, exc: aio.AioRpcError, *, sent: bool = True) -> Classified:
        """Classify a failed grpc.aio call."""
        return self.classify(exc.code(), exc.details(), sent=sent)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Classifier) and self.table() == other.table()

    def __hash__(self) -> int:
        return hash(tuple(sorted((c.name, _verdict_name(v)) for c, v in self.table().items())))

    def __repr__(self) -> str:
        return f"Classifier({self.name})"


def _classified(code: grpc.StatusCode, verdict: Verdict, reached: bool) -> Classified:
    if verdict is RETRYABLE_FAILURE:
        return Classified(code, Outcome.FAILURE, reached, retryable=True)
    assert isinstance(verdict, Outcome)
    return Classified(code, verdict, reached)


def _with_connection(result: Classified, *, reached_server: bool) -> Classified:
    return Classified(result.code, result.outcome, reached_server, True, result.retryable)


def _verdict(classified: Classified) -> Verdict:
    return RETRYABLE_FAILURE if classified.retryable else classified.outcome


def _verdict_name(verdict: Verdict) -> str:
    return str(verdict.value)


def _describe(rules: Mapping[grpc.StatusCode, Verdict], fallback: Classifier | None) -> str:
    named = ", ".join(f"{code.name}={_verdict_name(v)}" for code, v in rules.items())
    below = fallback.name if fallback is not None else "default"
    return f"{named} or else {below}" if named else below


_DEFAULT_VERDICTS: dict[grpc.StatusCode, Verdict] = dict(_OUTCOMES)

DEFAULT: Final = Classifier({}, name="default")
"""Today's table (the module docstring): what every method uses unless its policy says."""

RETRY_ON_ABORTED: Final = Classifier.of({_Code.ABORTED: RETRYABLE_FAILURE}, name="retry_on_aborted")
"""ABORTED (a concurrency conflict: the transaction lost a race) is a retryable failure."""

PRESETS: Final[Mapping[str, Classifier]] = MappingProxyType(
    {"default": DEFAULT, "retry_on_aborted": RETRY_ON_ABORTED}
)
"""Presets by the names a policy file uses (`classify = "retry_on_aborted"`)."""


def classify(code: grpc.StatusCode, details: str | None = None, *, sent: bool = True) -> Classified:
    """Classify a call's status by the default table; `sent=False` for failures the mesh made
    before sending."""
    return DEFAULT.classify(code, details, sent=sent)


def classify_error(exc: aio.AioRpcError, *, sent: bool = True) -> Classified:
    """Classify a failed grpc.aio call by the default table."""
    return DEFAULT.classify(exc.code(), exc.details(), sent=sent)
