"""Whether and when to retry: a policy value, and a per-call state that answers.

The mechanism (the attempt loops of mesh/client/) asks; this module decides, as in tower's
`retry::Policy` and urllib3's `Retry`: `RetryState.increment()` records a finished attempt
and returns a new state that says whether another attempt may be made and after what delay.
The state never sleeps, never reads a clock and draws randomness only from the RNG it is
given, so every rule is tested without waiting.

The rules, in order (gRPC's retry design, A6, where it has one):

1. Only a FAILURE outcome (mesh.core.outcome) is retried; CALLER_ERROR and NEUTRAL never are.
2. Server pushback that forbids a retry (negative or malformed) wins.
3. A request that certainly never reached the server and failed UNAVAILABLE (no connection,
   breaker open, no endpoint) may always be retried: nothing happened, any method is safe.
4. Otherwise the code must be in `retryable_codes`, or the method's classifier must have
   made it a retryable failure; RESOURCE_EXHAUSTED (an overloaded server) only with the
   server's valid pushback, since retrying on our own timer adds to the load.
5. A request that may have reached the server is retried only if the method is safe to
   repeat (proto `idempotency_level` NO_SIDE_EFFECTS or IDEMPOTENT, or an explicit setting).
6. Never more than `max_attempts` in all (capped at 5, as gRPC caps it).

The delay before a retry is the server's pushback when it gave one, else full-jitter
exponential backoff (25 ms base, 250 ms cap: Envoy's defaults). How many retries a service
may make overall is the budget's business (mesh.resilience.retry.budget), not the policy's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import MethodDescriptor

from mesh.core.backoff import ExponentialBackoff
from mesh.core.outcome import FAILURE_CODES, Classified, Outcome
from mesh.resilience.retry.pushback import NO_RETRY, Pushback

MAX_ATTEMPTS_CAP = 5
"""gRPC's retry design caps maxAttempts at 5; more only multiplies load during an outage."""

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_SAFE_LEVELS = frozenset(
    {descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT}
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one method is retried."""

    max_attempts: int = 3
    """Attempts in all, the first one included (1 = no retry); 1..5."""
    retryable_codes: frozenset[grpc.StatusCode] = frozenset({_UNAVAILABLE})
    """FAILURE codes that are retried; RESOURCE_EXHAUSTED only with server pushback."""
    backoff: ExponentialBackoff = ExponentialBackoff(0.025, 0.25)
    per_attempt_timeout: float | None = None
    """Seconds one attempt may take (never more than the call's remaining time)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_CAP:
            raise ValueError(
                f"max_attempts: must be 1..{MAX_ATTEMPTS_CAP}, got {self.max_attempts}"
            )
        object.__setattr__(self, "retryable_codes", frozenset(self.retryable_codes))
        for code in sorted(self.retryable_codes, key=lambda c: c.name):
            if code not in FAILURE_CODES:
                allowed = ", ".join(sorted(c.name for c in FAILURE_CODES))
                raise ValueError(
                    f"retryable_codes: {code.name} is never retried (only {allowed} may be)"
                )
        if self.per_attempt_timeout is not None and not self.per_attempt_timeout > 0:
            raise ValueError(f"per_attempt_timeout: must be > 0, got {self.per_attempt_timeout}")

    def start(self, *, idempotent: bool) -> RetryState:
        """The state of a new call, before its first attempt."""
        return RetryState(self, idempotent)

    def attempt_timeout(self, remaining: float) -> float:
        """The timeout of an attempt, given the call's `remaining` seconds: the one place
        every attempt loop asks (plain, hedged, streaming)."""
        limit = self.per_attempt_timeout
        return remaining if limit is None or remaining < limit else limit


@dataclass(frozen=True, slots=True)
class RetryState:
    """Where one call stands: attempts made, and whether (and when) another may be made."""

    policy: RetryPolicy
    idempotent: bool
    """The method is safe to repeat even if a request reached the server."""
    attempts: int = 0
    """Attempts finished so far."""
    may_retry: bool = True
    """Another attempt may be made (True before the first one)."""
    reason: str = "first attempt"
    """Why `may_retry` is what it is: for logs, span events and tests."""
    last: Classified | None = None
    pushback: float | None = None
    """The server's delay before the next attempt, when it gave one."""

    def increment(self, classified: Classified, pushback: Pushback = None) -> RetryState:
        """The state after an attempt ended as `classified`, with the server's `pushback`."""
        attempts = self.attempts + 1
        may_retry, reason = _decide(self.policy, self.idempotent, attempts, classified, pushback)
        return replace(
            self,
            attempts=attempts,
            may_retry=may_retry,
            reason=reason,
            last=classified,
            pushback=pushback if isinstance(pushback, float) else None,
        )

    def delay_for_next(self, rng: Callable[[], float]) -> float:
        """Seconds to wait before the next attempt; `rng()` returns a float in [0, 1)."""
        if not self.may_retry:
            raise ValueError(f"no further attempt may be made: {self.reason}")
        if self.attempts == 0:
            return 0.0
        if self.pushback is not None:
            return self.pushback
        return self.policy.backoff.delay(self.attempts, rng)

    def attempt_timeout(self, remaining: float) -> float:
        """The timeout of the next attempt, given the call's `remaining` seconds."""
        return self.policy.attempt_timeout(remaining)


def _decide(
    policy: RetryPolicy,
    idempotent: bool,
    attempts: int,
    classified: Classified,
    pushback: Pushback,
) -> tuple[bool, str]:
    code, outcome = classified.code, classified.outcome
    if outcome is Outcome.SUCCESS:
        return False, "succeeded"
    if outcome is not Outcome.FAILURE:
        return False, f"{code.name} ({outcome.value}) is never retried"
    if pushback is NO_RETRY:
        return False, "the server's pushback forbids a retry"
    if code is _UNAVAILABLE and not classified.reached_server:
        reason = "UNAVAILABLE before reaching the server"
    else:
        if code not in policy.retryable_codes and not classified.retryable:
            return False, f"{code.name} is not a retryable code"
        if code is _RESOURCE_EXHAUSTED and pushback is None:
            return False, "RESOURCE_EXHAUSTED is retried only on server pushback"
        if classified.reached_server and not idempotent:
            return False, f"{code.name} may have reached the server; method not idempotent"
        reason = f"retryable {code.name}"
    if attempts >= policy.max_attempts:
        return False, f"all {policy.max_attempts} attempts made"
    return True, reason


# -- idempotency from the proto ------------------------------------------------------------


def idempotent_from_descriptor(method: MethodDescriptor) -> bool:
    """True when the method's `idempotency_level` is NO_SIDE_EFFECTS or IDEMPOTENT."""
    return method.GetOptions().idempotency_level in _SAFE_LEVELS


def method_descriptor_for(full_method: str) -> MethodDescriptor | None:
    """The descriptor of "/pkg.Service/Method" in the default pool (its generated `_pb2`
    module must have been imported), or None."""
    service, sep, name = full_method.removeprefix("/").partition("/")
    if not (service and sep and name) or "/" in name:
        return None
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None


def method_is_idempotent(full_method: str, explicit: bool | None = None) -> bool:
    """An explicit per-method setting, else the proto's idempotency level; unknown: False."""
    if explicit is not None:
        return explicit
    descriptor = method_descriptor_for(full_method)
    return descriptor is not None and idempotent_from_descriptor(descriptor)
