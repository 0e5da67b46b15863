"""The attempt loop of a unary-unary call, and the call object a stub gets back.

Mechanism only: whether to retry, and after how long, is RetryState's decision
(mesh/resilience/retry/policy.py); which endpoint, the Upstream's (balancer minus ejected
endpoints); how an attempt ended, the method's classifier's (mesh/core/outcome.py). The
layers a call passes, in order, are mesh/layers.py's: first the admission
(mesh/client/admission.py), then attempts, each on a picked endpoint, bounded by the
remaining time (and the per-attempt timeout), retried on another endpoint while the policy
allows it, the budget has a token, and the backoff fits before the deadline; the attempt
number goes to the server in `previous-rpc-attempts` (mesh/client/attempt.py says why not
gRPC's reserved name). Hedged methods instead race a second attempt on another endpoint
after the hedge delay (mesh/client/hedging.py).

`UnaryUnaryCall` runs the loop inside the awaiting task (no extra task per call: this is the
hot path); only code(), details(), metadata and callbacks asked before completion start a
task for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import grpc
from grpc import aio
from opentelemetry.trace import Span

from mesh.client.attempt import (
    CANCELLED,
    OK,
    WaitResolved,
    pick_endpoint,
    pushback_of,
    start_attempt,
    verdict_of,
)
from mesh.client.hedging import run_hedged
from mesh.client.subchannels import CallableKey, SubChannel
from mesh.client.upstream import MethodPlan, Upstream
from mesh.core.errors import NoTimeLeft
from mesh.core.outcome import Outcome
from mesh.telemetry.call_spans import CallSpans


class UnaryUnaryCall(aio.UnaryUnaryCall[Any, Any]):
    """The call object of a unary-unary RPC on a MeshChannel.

    As on a plain grpc.aio channel, the RPC is on its way when the stub returns: the
    refusals are decided and the first attempt is started at once (unless a fault delay or
    discovery's first answer must be awaited). The rest of the loop (retries, hedges) runs
    when the call is awaited, inside the awaiting task.
    """

    _NEW, _RUNNING, _DONE = 0, 1, 2

    # Rarely changed from these; class attributes spare every call their assignment.
    _task: asyncio.Task[Any] | None = None
    _done: asyncio.Future[None] | None = None
    _attempt: Any = None
    _first: tuple[SubChannel, float] | None = None
    _response: Any = None
    _error: BaseException | None = None
    _refused: aio.AioRpcError | None = None
    _admitted = False
    _detached = False
    _callbacks: tuple[Callable[[Any], None], ...] | list[Callable[[Any], None]] = ()
    _spans: CallSpans | None = None
    _first_span: Span | None = None

    def __init__(
        self,
        upstream: Upstream,
        plan: MethodPlan,
        key: CallableKey,
        request: Any,
        timeout: float,
        kwargs: dict[str, Any],
        wait_resolved: WaitResolved,
        refused: aio.AioRpcError | None = None,
    ) -> None:
        """`refused`: fail the call with this error without sending anything."""
        self._upstream = upstream
        self._plan = plan
        self._key = key
        self._request = request
        self._kwargs = kwargs
        self._wait_resolved = wait_resolved
        now = upstream.clock()
        self._started_at = now
        self._deadline = now + timeout
        self._state = self._NEW
        if plan.tracer is not None:
            self._spans = CallSpans(plan.tracer, upstream.service, plan.full_method)
        if refused is not None:
            self._refused = refused
            return
        if plan.admission.waits:
            return  # a fault's delay may come first: the call is admitted when awaited
        self._refused = plan.admission.admit(self._deadline)
        if self._refused is not None:
            return
        self._admitted = True
        if plan.hedge is not None:
            return
        sub = upstream.pick(None)
        if sub is None:
            return  # discovery has not answered yet: the call waits for it when awaited
        self._first = (sub, sub.load.start())
        sub.attempts += 1
        if upstream.metrics is not None:
            upstream.attempt_started(plan.full_method, 0)
        multicallable = sub.multicallable(key)
        attempt_timeout = plan.retry.attempt_timeout(timeout)
        spans = self._spans
        if spans is not None:
            span = spans.attempt(
                sub.endpoint.host, sub.endpoint.port, 1, breaker_state=upstream.breaker.state
            )
            self._first_span = span
            kwargs = spans.carried(span, kwargs)
        attempt = multicallable(request, timeout=attempt_timeout, **kwargs)
        attempt.add_done_callback(self._first_attempt_done)
        self._attempt = attempt

    def _first_attempt_done(self, attempt: Any) -> None:
        """A call nobody awaited still gives back its bulkhead slot (and endpoint load) when
        its first attempt ends; awaiting it later returns that attempt's result, as grpc.aio
        would, without retries."""
        if self._state != self._NEW or self._first is None:
            return
        sub, started = self._first
        self._first = None
        self._upstream.record(sub, started, CANCELLED)
        if self._spans is not None:
            self._end_first_span(None)
            self._spans.ended(None)
        self._plan.admission.release(Outcome.NEUTRAL)
        self._admitted = False
        self._refused = None
        self._state = self._DONE
        self._detached = True

    async def _execute(self) -> Any:
        """The whole call. The common case (admitted, first attempt started, no hedge, it
        succeeds) runs here without further coroutines; the rest is in `_slow_path`."""
        self._state = self._RUNNING
        upstream = self._upstream
        try:
            first = self._first
            if first is None:
                response = await self._slow_path()
            else:
                self._first = None
                sub, started = first
                try:
                    response = await self._attempt
                except aio.AioRpcError as exc:
                    self._end_first_span(exc)
                    response = await self._settle(self._attempts((exc, sub, started)))
                except BaseException as exc:
                    self._end_first_span(exc)
                    upstream.record(sub, started, CANCELLED)
                    self._plan.admission.release(Outcome.NEUTRAL)
                    raise
                else:
                    self._end_first_span(None)
                    upstream.record(sub, started, OK)
                    self._plan.admission.release(Outcome.SUCCESS)
            self._response = response
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._state = self._DONE
            if self._spans is not None:
                self._end_call_span()
            if upstream.metrics is not None:
                upstream.call_finished(
                    self._plan.full_method, self._error, upstream.clock() - self._started_at
                )
            if self._done is not None and not self._done.done():
                self._done.set_result(None)
            for callback in self._callbacks:
                callback(self)
        return response

    def _end_first_span(self, error: BaseException | None) -> None:
        span, self._first_span = self._first_span, None
        CallSpans.attempt_ended(span, error)

    def _end_call_span(self) -> None:
        spans, error = self._spans, self._error
        assert spans is not None
        if error is not None and error is self._refused:
            spans.event("refused by the mesh", reason=self._refused.details() or "")
        spans.ended(error)

    async def _slow_path(self) -> Any:
        """Calls that start late: admission that may wait (a fault), a refusal, hedging, or
        waiting for discovery's first answer."""
        upstream, plan = self._upstream, self._plan
        if not self._admitted and self._refused is None:
            self._refused = await plan.admission.admit_waiting(self._deadline)
            self._admitted = self._refused is None
        if self._refused is not None:
            raise self._refused
        if plan.hedge is not None:
            return await self._settle(
                run_hedged(
                    upstream,
                    plan,
                    self._key,
                    self._request,
                    self._deadline,
                    self._kwargs,
                    self._wait_resolved,
                    self._spans,
                )
            )
        return await self._settle(self._attempts(None))

    async def _settle(self, attempts: Coroutine[Any, Any, Any]) -> Any:
        """Run an admitted call's attempts; release its admission with how it ended."""
        try:
            response = await attempts
        except BaseException as exc:
            self._plan.admission.release(verdict_of(exc, self._plan.classifier))
            raise
        self._plan.admission.release(Outcome.SUCCESS)
        return response

    async def _attempts(self, failed: tuple[aio.AioRpcError, SubChannel, float] | None) -> Any:
        """Attempts until one succeeds or the policy, budget or deadline says stop;
        `failed` is the first attempt when it has already failed."""
        upstream, plan = self._upstream, self._plan
        clock = upstream.clock
        state = plan.retry.start(idempotent=plan.idempotent)
        exclude: SubChannel | None = None
        spans = self._spans
        backoff = 0.0
        while True:
            if failed is None:
                sub = await pick_endpoint(upstream, exclude, self._deadline, self._wait_resolved)
                if self._deadline - clock() <= 0:
                    raise NoTimeLeft(upstream.service, plan.full_method).to_rpc_error()
                started = sub.load.start()
                self._attempt, span = start_attempt(
                    upstream,
                    sub,
                    self._key,
                    self._request,
                    plan.retry.attempt_timeout(self._deadline - clock()),
                    self._kwargs,
                    state.attempts,
                    spans,
                    backoff=backoff,
                )
                try:
                    response = await self._attempt
                except aio.AioRpcError as attempt_error:
                    failed = (attempt_error, sub, started)
                    CallSpans.attempt_ended(span, attempt_error)
                except asyncio.CancelledError as cancelled:
                    upstream.record(sub, started, CANCELLED)
                    CallSpans.attempt_ended(span, cancelled)
                    raise
                else:
                    upstream.record(sub, started, OK)
                    CallSpans.attempt_ended(span, None)
                    return response
            error, sub, started = failed
            failed = None
            classified = plan.classifier.classify_error(error)
            upstream.record(sub, started, classified)
            state = state.increment(classified, pushback_of(error))
            if not state.may_retry:
                raise error
            delay = state.delay_for_next(upstream.rng)
            if clock() + delay >= self._deadline:
                raise error
            if not upstream.budget.try_withdraw():
                upstream.budget_exhausted()
                if spans is not None:
                    spans.event("retry budget exhausted", service=upstream.service)
                raise error
            if delay > 0:
                await asyncio.sleep(delay)
            backoff = delay
            exclude = sub

    def _result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._response

    async def _wait(self) -> None:
        if self._state == self._NEW:
            self._task = asyncio.get_running_loop().create_task(self._execute())
        if self._state != self._DONE:
            if self._done is None:
                self._done = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._done)

    def __await__(self) -> Generator[Any, None, Any]:
        if self._state == self._NEW:
            return self._execute().__await__()
        if self._detached:
            return self._attempt.__await__()  # type: ignore[no-any-return]
        return self._awaited().__await__()

    async def _awaited(self) -> Any:
        await self._wait()
        return self._result()

    # -- RpcContext ---------------------------------------------------------------------

    def cancelled(self) -> bool:
        return isinstance(self._error, asyncio.CancelledError)

    def done(self) -> bool:
        return self._state == self._DONE

    def time_remaining(self) -> float | None:
        return max(self._deadline - self._upstream.clock(), 0.0)

    def cancel(self) -> bool:
        if self._state == self._DONE:
            return False
        if self._task is not None:
            return self._task.cancel()
        if self._attempt is not None:
            return bool(self._attempt.cancel())
        return False

    def add_done_callback(self, callback: Any) -> None:
        if self._state == self._DONE:
            callback(self)
        else:
            self._callbacks = [*self._callbacks, callback]

    # -- Call ---------------------------------------------------------------------------

    async def _final_error(self) -> aio.AioRpcError | None:
        if self._detached:
            try:
                await self._attempt
            except aio.AioRpcError as exc:
                return exc
            return None
        await self._wait()
        return self._error if isinstance(self._error, aio.AioRpcError) else None

    async def initial_metadata(self) -> aio.Metadata:
        error = await self._final_error()
        if error is not None:
            return error.initial_metadata()
        return await self._attempt.initial_metadata()  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> aio.Metadata:
        error = await self._final_error()
        if error is not None:
            return error.trailing_metadata()  # type: ignore[return-value]
        return await self._attempt.trailing_metadata()  # type: ignore[no-any-return]

    async def code(self) -> grpc.StatusCode:
        error = await self._final_error()
        if error is not None:
            return error.code()
        if isinstance(self._error, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.OK

    async def details(self) -> str:
        error = await self._final_error()
        return (error.details() or "") if error is not None else ""

    async def wait_for_connection(self) -> None:
        await self._wait()
