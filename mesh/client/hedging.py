"""Hedged requests: race a second attempt against a slow first one.

"The Tail at Scale" (Dean and Barroso, 2013): when an attempt has taken longer than most do
(the hedge delay: the policy's, else the recent p95 latency of the service), send the same
request to another endpoint and take whichever answers first; cancel the rest. Only methods
that are safe to repeat are hedged (MethodPlan drops the hedge otherwise), and every hedge
takes a token from the retry budget, so hedging cannot multiply load in an outage. gRPC's
C core does not implement its own hedging policy, so grpcio users cannot get this elsewhere.

When every attempt in flight has failed, the ordinary retry rules apply to the last failure.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from mesh.client.attempt import (
    CANCELLED,
    OK,
    WaitResolved,
    pick_endpoint,
    pushback_of,
    start_attempt,
)
from mesh.client.subchannels import CallableKey, SubChannel
from mesh.client.upstream import MethodPlan, Upstream
from mesh.core.errors import NoTimeLeft
from mesh.core.outcome import Classifier
from mesh.telemetry.call_spans import CallSpans


async def run_hedged(
    upstream: Upstream,
    plan: MethodPlan,
    key: CallableKey,
    request: Any,
    deadline: float,
    kwargs: dict[str, Any],
    wait_resolved: WaitResolved,
    spans: CallSpans | None = None,
) -> Any:
    """Attempts raced after the hedge delay; the first success wins, the rest are cancelled."""
    assert plan.hedge is not None
    loop = asyncio.get_running_loop()
    clock = upstream.clock
    state = plan.retry.start(idempotent=True)
    hedges_left = plan.hedge.max_hedges
    running: dict[asyncio.Task[Any], SubChannel] = {}
    started_attempts = 0
    last_sub: SubChannel | None = None
    last_error: aio.AioRpcError | None = None

    def launch(sub: SubChannel, hedge: bool = False) -> None:
        nonlocal started_attempts, last_sub
        remaining = deadline - clock()
        task = loop.create_task(
            _attempt(
                upstream,
                sub,
                key,
                request,
                plan.retry.attempt_timeout(remaining),
                kwargs,
                started_attempts,
                spans,
                hedge,
                plan.classifier,
            )
        )
        running[task] = sub
        started_attempts += 1
        last_sub = sub

    launch(await pick_endpoint(upstream, None, deadline, wait_resolved))
    try:
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                raise last_error or NoTimeLeft(upstream.service, plan.full_method).to_rpc_error()
            delay = upstream.hedge_delay(plan.hedge) if hedges_left else None
            wait = remaining if delay is None else min(delay, remaining)
            done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                running.pop(task)
                error = task.exception()
                if error is None:
                    return task.result()
                if not isinstance(error, aio.AioRpcError):
                    raise error
                last_error = error
                classified = plan.classifier.classify_error(error)
                state = state.increment(classified, pushback_of(error))
            if not done:
                if delay is not None and upstream.budget.try_withdraw():
                    hedges_left -= 1
                    sub = upstream.pick(exclude=last_sub)
                    if sub is not None and sub not in running.values():
                        launch(sub, hedge=True)
                else:
                    hedges_left = 0
                continue
            if running:
                continue
            assert last_error is not None
            if not state.may_retry:
                raise last_error
            backoff = state.delay_for_next(upstream.rng)
            if clock() + backoff >= deadline:
                raise last_error
            if not upstream.budget.try_withdraw():
                upstream.budget_exhausted()
                raise last_error
            if backoff > 0:
                await asyncio.sleep(backoff)
            launch(await pick_endpoint(upstream, last_sub, deadline, wait_resolved))
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def _attempt(
    upstream: Upstream,
    sub: SubChannel,
    key: CallableKey,
    request: Any,
    timeout: float,
    kwargs: dict[str, Any],
    previous: int,
    spans: CallSpans | None,
    hedge: bool,
    classifier: Classifier,
) -> Any:
    started = sub.load.start()
    attempt, span = start_attempt(
        upstream, sub, key, request, timeout, kwargs, previous, spans, hedge=hedge
    )
    try:
        response = await attempt
    except aio.AioRpcError as exc:
        upstream.record(sub, started, classifier.classify_error(exc))
        CallSpans.attempt_ended(span, exc)
        raise
    except asyncio.CancelledError as cancelled:
        attempt.cancel()
        upstream.record(sub, started, CANCELLED)
        CallSpans.attempt_ended(span, cancelled)
        raise
    upstream.record(sub, started, OK)
    CallSpans.attempt_ended(span, None)
    return response
