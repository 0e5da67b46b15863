"""The attempt loop of a unary-unary call, and the call object a stub gets back.

Mechanism only: whether to retry, and after how long, is RetryState's decision
(mesh/retry/policy.py); which endpoint, the Upstream's (balancer minus ejected endpoints);
how an attempt ended, the classifier's (mesh/outcome.py). The loop:

1. the deadline: the caller's timeout, else the inbound call's remaining time, else the
   method's default (mesh/deadline.py); no time left -> DEADLINE_EXCEEDED at once;
2. client-side fault injection, when configured;
3. the breaker (open -> UNAVAILABLE at once) and the bulkhead (full -> RESOURCE_EXHAUSTED);
4. attempts: each on a picked endpoint, bounded by the remaining time (and the per-attempt
   timeout), retried on another endpoint while the policy allows it, the budget has a token,
   and the backoff fits before the deadline; the attempt number goes to the server in
   `previous-rpc-attempts` (mesh/attempt.py says why not gRPC's reserved name);
5. hedged methods instead race a second attempt on another endpoint after the hedge delay.

`UnaryUnaryCall` runs the loop inside the awaiting task (no extra task per call: this is the
hot path); only code(), details(), metadata and callbacks asked before completion start a
task for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import grpc
from grpc import aio

from mesh.attempt import (
    CANCELLED,
    OK,
    WaitResolved,
    pick_endpoint,
    pushback_of,
    record_call,
    start_attempt,
)
from mesh.errors import BulkheadFull, CircuitOpen, NoTimeLeft, RefusedByMesh
from mesh.faults import fault_message
from mesh.hedging import run_hedged
from mesh.outcome import classify_error
from mesh.subchannels import CallableKey, SubChannel
from mesh.upstream import MethodPlan, Upstream


class UnaryUnaryCall(aio.UnaryUnaryCall[Any, Any]):
    """The call object of a unary-unary RPC on a MeshChannel.

    As on a plain grpc.aio channel, the RPC is on its way when the stub returns: the
    refusals are decided and the first attempt is started at once (unless a fault delay or
    discovery's first answer must be awaited). The rest of the loop (retries, hedges) runs
    when the call is awaited, inside the awaiting task.
    """

    __slots__ = (
        "_admitted",
        "_attempt",
        "_callbacks",
        "_deadline",
        "_detached",
        "_done",
        "_error",
        "_first",
        "_key",
        "_kwargs",
        "_plan",
        "_refused",
        "_request",
        "_response",
        "_state",
        "_task",
        "_upstream",
        "_wait_resolved",
    )

    _NEW, _RUNNING, _DONE = 0, 1, 2

    def __init__(
        self,
        upstream: Upstream,
        plan: MethodPlan,
        key: CallableKey,
        request: Any,
        timeout: float,
        kwargs: dict[str, Any],
        wait_resolved: WaitResolved,
    ) -> None:
        self._upstream = upstream
        self._plan = plan
        self._key = key
        self._request = request
        self._kwargs = kwargs
        self._wait_resolved = wait_resolved
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._state = self._NEW
        self._task: asyncio.Task[Any] | None = None
        self._done: asyncio.Future[None] | None = None
        self._attempt: Any = None
        self._first: tuple[SubChannel, float] | None = None
        self._response: Any = None
        self._error: BaseException | None = None
        self._refused: aio.AioRpcError | None = None
        self._admitted = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._detached = False
        if timeout <= 0:
            self._refused = NoTimeLeft(upstream.service, plan.full_method).to_rpc_error()
        elif plan.faults is None:
            self._admit()
            if self._admitted and plan.hedge is None:
                sub = upstream.pick(None)
                if sub is not None:
                    self._first = (sub, sub.load.start())
                    self._attempt = start_attempt(
                        sub, key, request, self._attempt_timeout(), kwargs, 0
                    )
                    self._attempt.add_done_callback(self._first_attempt_done)

    def _first_attempt_done(self, attempt: Any) -> None:
        """A call nobody awaited still gives back its bulkhead slot (and endpoint load) when
        its first attempt ends; awaiting it later returns that attempt's result, as grpc.aio
        would, without retries."""
        if self._state != self._NEW or self._first is None:
            return
        sub, started = self._first
        self._first = None
        self._upstream.record(sub, started, CANCELLED)
        self._upstream.bulkhead.release()
        self._upstream.breaker.record_neutral()
        self._admitted = False
        self._refused = None
        self._state = self._DONE
        self._detached = True

    def _attempt_timeout(self) -> float:
        remaining = self._deadline - asyncio.get_running_loop().time()
        limit = self._plan.retry.per_attempt_timeout
        return remaining if limit is None or remaining < limit else limit

    def _admit(self) -> None:
        """The breaker, then the bulkhead; an admitted call counts for the retry budget."""
        upstream = self._upstream
        if not upstream.breaker.allow():
            self._refused = CircuitOpen(upstream.service).to_rpc_error()
        elif not upstream.bulkhead.try_acquire():
            upstream.breaker.record_neutral()
            limit = upstream.policy.bulkhead.max_concurrent
            self._refused = BulkheadFull(upstream.service, limit).to_rpc_error()
        else:
            self._admitted = True
            upstream.budget.deposit()

    async def _run(self) -> Any:
        upstream, plan = self._upstream, self._plan
        if not self._admitted and self._refused is None:
            await _inject_fault(plan, self._deadline)
            self._admit()
        if self._refused is not None:
            raise self._refused
        try:
            if plan.hedge is not None:
                response = await run_hedged(
                    upstream,
                    plan,
                    self._key,
                    self._request,
                    self._deadline,
                    self._kwargs,
                    self._wait_resolved,
                )
            else:
                response = await self._attempts()
        except aio.AioRpcError as exc:
            record_call(upstream, exc)
            raise
        except BaseException:
            upstream.breaker.record_neutral()
            raise
        finally:
            upstream.bulkhead.release()
        upstream.breaker.record(True)
        return response

    async def _attempts(self) -> Any:
        upstream, plan = self._upstream, self._plan
        loop = asyncio.get_running_loop()
        state = plan.retry.start(idempotent=plan.idempotent)
        first, self._first = self._first, None
        exclude: SubChannel | None = None
        while True:
            if first is not None:
                sub, started = first
                first = None
            else:
                sub = await pick_endpoint(upstream, exclude, self._deadline, self._wait_resolved)
                if self._deadline - loop.time() <= 0:
                    raise NoTimeLeft(upstream.service, plan.full_method).to_rpc_error()
                started = sub.load.start()
                self._attempt = start_attempt(
                    sub,
                    self._key,
                    self._request,
                    self._attempt_timeout(),
                    self._kwargs,
                    state.attempts,
                )
            try:
                response = await self._attempt
            except aio.AioRpcError as exc:
                classified = classify_error(exc)
                upstream.record(sub, started, classified)
                state = state.increment(classified, pushback_of(exc))
                if not state.may_retry:
                    raise
                delay = state.delay_for_next(upstream.rng)
                if loop.time() + delay >= self._deadline or not upstream.budget.try_withdraw():
                    raise
                if delay > 0:
                    await asyncio.sleep(delay)
                exclude = sub
                continue
            except asyncio.CancelledError:
                upstream.record(sub, started, CANCELLED)
                raise
            upstream.record(sub, started, OK)
            return response

    async def _execute(self) -> Any:
        self._state = self._RUNNING
        try:
            self._response = await self._run()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._state = self._DONE
            if self._done is not None and not self._done.done():
                self._done.set_result(None)
            for callback in self._callbacks:
                callback(self)
        return self._response

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
        return max(self._deadline - asyncio.get_running_loop().time(), 0.0)

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
            self._callbacks.append(callback)

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


async def _inject_fault(plan: MethodPlan, deadline: float) -> None:
    assert plan.faults is not None
    decision = plan.faults.decide()
    if decision.delay > 0:
        await asyncio.sleep(
            min(decision.delay, max(deadline - asyncio.get_running_loop().time(), 0.0))
        )
    if decision.abort is not None:
        raise RefusedByMesh(decision.abort, fault_message(decision.abort, plan.full_method))
