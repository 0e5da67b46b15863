"""Rate limiting at the edge: GCRA per consumer and route.

GCRA (the Generic Cell Rate Algorithm, from ATM networks; Brandur Leach's "Rate limiting,
cells, and GCRA" is the usual account) keeps one number per key, the theoretical arrival time
(TAT) of the next request, and needs no refill task: a request at `now` is allowed when
`max(TAT, now) + T - now <= burst * T` (T = 1 / rate), and then moves TAT to that value. It
allows `burst` requests at once and `rate` per second after that, and says exactly how long a
refused request must wait. A token bucket needs the same two numbers per key and a refill
rule; GCRA's one timestamp is why redis-cell and Stripe use it.

`Limit` is the value (rate and burst), `GcraLimiter` the local state (one dict of TATs, with
stale keys swept; ratelimit_redis.py keeps it in Redis instead, shared by the replicas), and
the RateLimitInterceptor refuses a call over its limit with
RESOURCE_EXHAUSTED, a `google.rpc.RetryInfo` in the status details (grpc-status-details-bin,
as grpcio-status writes it) and a `retry-after` trailer in whole seconds. The consumer is the
verified user (meshkit/gateway/auth.py, which runs first), else the client's address; the
route is the method.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from mesh.server.hooks import BehaviorInterceptor, Exit, Hook
from meshkit.gateway.auth import MethodPatterns
from meshkit.gateway.calls import call_of

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


class Limiter(Protocol):
    """Where GCRA's state is: this process (GcraLimiter) or Redis (ratelimit_redis.py)."""

    def decide(self, key: str, limit: Limit) -> Decision | Awaitable[Decision]: ...


Decided = Callable[[str, bool], None]
"""Told (method, allowed) for every call the limiter decides on."""


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` requests per second on average, `burst` of them at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate > 0 or math.isinf(self.rate):
            raise ValueError(f"rate must be > 0 per second, got {self.rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")

    @property
    def interval(self) -> float:
        """T: the time one request uses up."""
        return 1.0 / self.rate

    @property
    def window(self) -> float:
        """The seconds a full burst takes to come back (`RateLimit-Policy`'s w)."""
        return self.burst * self.interval

    def describe(self) -> str:
        return f"{self.rate:g}/s, burst {self.burst}"


def parse_rate(text: str) -> float:
    """Requests per second of `20/s`, `600/min`, `1000/hour`."""
    found = _RATE.match(text)
    if found is None:
        raise ValueError(f"rate {text!r}: expected N/s, N/min or N/hour")
    return float(found.group(1)) / _PER[found.group(2)]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int
    """Requests that could still go at once."""
    retry_after: float
    """Seconds until this request would be allowed (0 when it is)."""
    reset_after: float
    """Seconds until the full burst is available again."""


class GcraLimiter:
    """GCRA's state for any number of keys, in this process."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._max_keys = max_keys

    def decide(self, key: str, limit: Limit) -> Decision:
        now = self._clock()
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + limit.interval
        allowed_at = new_tat - limit.window
        if allowed_at > now:
            return Decision(False, 0, allowed_at - now, tat - now)
        if len(self._tat) >= self._max_keys and key not in self._tat:
            self._sweep(now)
        self._tat[key] = new_tat
        remaining = int((limit.window - (new_tat - now)) / limit.interval + 1e-9)
        return Decision(True, remaining, 0.0, new_tat - now)

    def _sweep(self, now: float) -> None:
        """Forget keys whose TAT has passed: they are back at a full burst anyway."""
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}

    def __len__(self) -> int:
        return len(self._tat)


@dataclass(frozen=True, slots=True)
class RouteLimit:
    methods: MethodPatterns
    limit: Limit


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The default limit, and the routes (methods) whose limits differ (first match)."""

    default: Limit = Limit(20.0, 40)
    routes: tuple[RouteLimit, ...] = ()

    def for_method(self, method: str) -> Limit:
        return next((r.limit for r in self.routes if r.methods.matches(method)), self.default)


class RateLimitInterceptor(BehaviorInterceptor):
    """Refuses calls over their consumer's limit on their route (see the module docstring)."""

    def __init__(
        self,
        limits: RateLimits,
        limiter: Limiter,
        *,
        applies: Callable[[str], bool] = lambda method: True,
        on_decision: Decided | None = None,
    ) -> None:
        super().__init__()
        self._limits = limits
        self._limiter = limiter
        self._applies = applies
        self._on_decision = on_decision or (lambda method, allowed: None)

    def hook_for(self, method: str) -> Hook:
        limit = self._limits.for_method(method)
        limiter, applies, told = self._limiter, self._applies, self._on_decision

        async def enter(context: aio.ServicerContext[Any, Any]) -> Exit | None:
            if not applies(method):
                return None
            call = call_of(context)
            decided = limiter.decide(f"{call.consumer} {method}", limit)
            decision = await decided if inspect.isawaitable(decided) else decided
            call.rate_limit = "allowed" if decision.allowed else "limited"
            told(method, decision.allowed)
            if not decision.allowed:
                await refuse(context, method, limit, decision)
            return None

        return enter


def refusal_status(method: str, limit: Limit, decision: Decision) -> grpc.Status:
    """RESOURCE_EXHAUSTED with RetryInfo in the details and a `retry-after` trailer."""
    delay = duration_pb2.Duration()
    delay.FromTimedelta(timedelta(seconds=decision.retry_after))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    message = (
        f"rate limit of {method} exceeded ({limit.describe()}): "
        f"retry in {decision.retry_after:.3f}s"
    )
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    )
    return _WithRetryAfter(status, limit, decision)


async def refuse(
    context: aio.ServicerContext[Any, Any], method: str, limit: Limit, decision: Decision
) -> NoReturn:
    status = refusal_status(method, limit, decision)
    await context.abort(status.code, status.details, status.trailing_metadata)


class _WithRetryAfter(grpc.Status):
    """The status with `retry-after` (whole seconds), and the IETF draft's `ratelimit-policy`
    (q: the burst, w: the seconds it takes to refill) and `ratelimit` (r: calls left, t: the
    seconds until the burst is whole again), which the HTTP port turns into headers."""

    def __init__(self, status: grpc.Status, limit: Limit, decision: Decision) -> None:
        self.code = status.code
        self.details = status.details
        trailers: Sequence[tuple[str, Any]] = tuple(status.trailing_metadata or ())
        window = max(1, math.ceil(limit.window))
        self.trailing_metadata = (
            *trailers,
            ("retry-after", str(max(1, math.ceil(decision.retry_after)))),
            ("ratelimit-policy", f'"gateway";q={limit.burst};w={window}'),
            ("ratelimit", f'"gateway";r={decision.remaining};t={math.ceil(decision.reset_after)}'),
        )
