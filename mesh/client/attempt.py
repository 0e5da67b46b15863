"""One attempt: picking its endpoint, starting it, and what the breaker learns from a call.

Shared by the plain attempt loop (mesh/client/unary_call.py), hedging
(mesh/client/hedging.py) and the streaming calls (mesh/client/stream_call.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from grpc import aio
from opentelemetry.trace import Span

from mesh.client.subchannels import CallableKey, SubChannel
from mesh.client.upstream import Upstream
from mesh.core.errors import NoHealthyEndpoints, NotResolved, RefusedByMesh
from mesh.core.outcome import Classifier, Outcome, classify
from mesh.resilience.retry.pushback import Pushback, parse_pushback
from mesh.telemetry.call_spans import CallSpans

PREVIOUS_ATTEMPTS = "previous-rpc-attempts"
"""Metadata that tells the server how many attempts came before this one. gRPC's retry design
(A6) names it grpc-previous-rpc-attempts, but grpc-* keys are reserved and grpcio's core
drops them from application metadata, so a Python server could never see it; the mesh sends
the same value without the reserved prefix."""
OK = classify(grpc.StatusCode.OK)
CANCELLED = classify(grpc.StatusCode.CANCELLED)

WaitResolved = Callable[[float], Awaitable[bool]]
"""Waits (until an absolute loop time) for discovery's first answer; False on timeout."""


async def pick_endpoint(
    upstream: Upstream, exclude: SubChannel | None, deadline: float, wait_resolved: WaitResolved
) -> SubChannel:
    """An endpoint for the next attempt, waiting for discovery's first answer if need be."""
    sub = upstream.pick(exclude)
    if sub is not None:
        return sub
    if not upstream.pool.resolved:
        started = upstream.clock()
        if not await wait_resolved(deadline):
            raise NotResolved(upstream.service, upstream.clock() - started).to_rpc_error()
        sub = upstream.pick(exclude)
        if sub is not None:
            return sub
    raise NoHealthyEndpoints(upstream.service).to_rpc_error()


def start_attempt(
    upstream: Upstream,
    sub: SubChannel,
    key: CallableKey,
    request: Any,
    timeout: float,
    kwargs: dict[str, Any],
    previous: int,
    spans: CallSpans | None,
    *,
    hedge: bool = False,
    backoff: float = 0.0,
) -> tuple[Any, Span | None]:
    """Start one attempt on `sub`, and its span when the call is traced (None otherwise, or
    when it is not sampled); retries tell the server how many came before."""
    sub.attempts += 1
    upstream.attempt_started(key.method, previous, hedge)
    if previous:
        kwargs = {
            **kwargs,
            "metadata": (*(kwargs["metadata"] or ()), (PREVIOUS_ATTEMPTS, str(previous))),
        }
    span = None
    if spans is not None:
        span = spans.attempt(
            sub.endpoint.host,
            sub.endpoint.port,
            previous + 1,
            hedge=hedge,
            backoff=backoff,
            breaker_state=upstream.breaker.state,
        )
        kwargs = spans.carried(span, kwargs)
    return sub.multicallable(key)(request, timeout=timeout, **kwargs), span


def verdict_of(error: BaseException | None, classifier: Classifier) -> Outcome:
    """How an admitted call ended, for its admission's release (the breaker counts calls, by
    their last attempt, not attempts), as the method's classifier says. A call the mesh
    refused itself, or one that ended without a gRPC status (cancelled), says nothing about
    the service: NEUTRAL."""
    if error is None:
        return Outcome.SUCCESS
    if isinstance(error, RefusedByMesh) or not isinstance(error, aio.AioRpcError):
        return Outcome.NEUTRAL
    return classifier.classify_error(error).outcome


def pushback_of(error: aio.AioRpcError) -> Pushback:
    """The server's retry pushback (grpc-retry-pushback-ms) in a failed attempt's trailers."""
    return parse_pushback(cast(aio.Metadata, error.trailing_metadata()))
