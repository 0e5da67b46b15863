"""Streaming calls (unary-stream, stream-unary, stream-stream) with retries until commit.

gRPC's retry design (A6) commits a streaming call once the first response message has
arrived: from then on the client has acted on the answer, and a retry would replay it. Before
that, a failed attempt is retried like a unary one (same RetryState rules, budget, backoff,
deadline, another endpoint), and the request messages sent so far are replayed to the new
attempt from a buffer. The buffer is bounded (`MAX_BUFFERED` messages): a call that sends
more before its first response commits early, as gRPC's retry buffer limit does.

The call object is the same for the three shapes: reads (`read()`, `async for`) and the
unary response (`await call`) drive the attempts; writes (`write()`, `done_writing()`) go to
the current attempt and into the buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator
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
from mesh.client.subchannels import CallableKey, SubChannel
from mesh.client.upstream import MethodPlan, Upstream
from mesh.core.errors import NoTimeLeft
from mesh.core.outcome import Outcome
from mesh.telemetry.call_spans import CallSpans

MAX_BUFFERED = 64
EOF: Any = aio.EOF  # type: ignore[attr-defined]  # grpc-stubs predate it
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Sent:
    """The status an attempt's server sent, taken when the attempt ended, before a failed
    write can overwrite it (grpc/grpc#36066). It reads grpc.aio's call object, whose status
    has no public synchronous accessor; where that object differs (a fake channel, a later
    grpc), it knows nothing and the attempt's own error stands."""

    __slots__ = ("status",)

    def __init__(self, attempt: Any) -> None:
        self.status = getattr(getattr(attempt, "_cython_call", None), "_status", None)

    def error_for(self, error: aio.AioRpcError) -> aio.AioRpcError | None:
        """`error` as the server sent it: None if it ended the call with OK."""
        status = self.status
        if status is None or error.code() is not grpc.StatusCode.INTERNAL:
            return error
        code = _CODES.get(status.code())
        if code is None or code is grpc.StatusCode.INTERNAL:
            return error
        if code is grpc.StatusCode.OK:
            return None
        return aio.AioRpcError(
            code,
            error.initial_metadata(),
            aio.Metadata(*status.trailing_metadata()),
            status.details(),
            status.debug_error_string(),
        )


_NOTHING_SENT = _Sent(None)


class _Replay:
    """The request messages of a call, kept for replay until the call commits."""

    def __init__(self, source: Any) -> None:
        self.sent: list[Any] = []
        self.overflowed = False
        self.done_writing = False
        self._source = source
        self._source_iter: Any = None
        self._source_is_async = hasattr(source, "__aiter__")

    def keep(self, message: Any) -> None:
        if not self.overflowed:
            self.sent.append(message)
            if len(self.sent) > MAX_BUFFERED:
                self.overflowed = True
                self.sent.clear()

    async def messages(self) -> AsyncIterator[Any]:
        """What a new attempt sends: the buffered messages, then the rest of the source."""
        for message in list(self.sent):
            yield message
        if self._source is None:
            return
        if self._source_iter is None:
            self._source_iter = aiter(self._source) if self._source_is_async else iter(self._source)
        while True:
            try:
                if self._source_is_async:
                    message = await anext(self._source_iter)
                else:
                    message = next(self._source_iter)
            except (StopIteration, StopAsyncIteration):
                return
            self.keep(message)
            yield message


class StreamingCall(
    aio.UnaryStreamCall[Any, Any],
    aio.StreamUnaryCall[Any, Any],
    aio.StreamStreamCall[Any, Any],
):
    """The call object of a streaming RPC on a MeshChannel."""

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
        self._upstream = upstream
        self._plan = plan
        self._key = key
        self._kwargs = kwargs
        self._wait_resolved = wait_resolved
        shape = key.shape
        self._request_streaming = shape.startswith("stream_")
        self._request = None if self._request_streaming else request
        self._replay = _Replay(request) if self._request_streaming else None
        self._writer_api = self._request_streaming and request is None
        loop = asyncio.get_running_loop()
        self._started_at = upstream.clock()
        self._deadline = self._started_at + timeout
        self._state = plan.retry.start(idempotent=plan.idempotent)
        self._attempt: Any = None
        self._sent = _NOTHING_SENT
        self._sub: SubChannel | None = None
        self._started = 0.0
        self._committed = False
        self._finished = False
        self._error: BaseException | None = None
        self._admitted = False
        self._spans = (
            CallSpans(plan.tracer, upstream.service, plan.full_method)
            if plan.tracer is not None
            else None
        )
        self._attempt_span: Span | None = None
        self._ready = loop.create_task(self._begin(refused))

    # -- attempts -----------------------------------------------------------------------

    async def _begin(self, refused: aio.AioRpcError | None) -> None:
        if refused is not None:
            raise refused
        refused = await self._plan.admission.admit_waiting(self._deadline)
        if refused is not None:
            raise refused
        self._admitted = True
        await self._start_attempt(None)

    async def _start_attempt(self, exclude: SubChannel | None) -> None:
        sub = await pick_endpoint(self._upstream, exclude, self._deadline, self._wait_resolved)
        remaining = self._deadline - self._upstream.clock()
        if remaining <= 0:
            raise NoTimeLeft(self._upstream.service, self._plan.full_method).to_rpc_error()
        if self._replay is not None and not self._writer_api:
            request: Any = self._replay.messages()
        else:
            request = self._request
        self._started = sub.load.start()
        self._sub = sub
        self._sent = _NOTHING_SENT
        self._attempt, self._attempt_span = start_attempt(
            self._upstream,
            sub,
            self._key,
            request,
            self._plan.retry.attempt_timeout(remaining),
            self._kwargs,
            self._state.attempts,
            self._spans,
        )
        self._attempt.add_done_callback(self._attempt_done)
        if self._writer_api and self._replay is not None:
            for message in self._replay.sent:
                await self._attempt.write(message)
            if self._replay.done_writing:
                await self._attempt.done_writing()

    async def _current(self) -> Any:
        try:
            await asyncio.shield(self._ready)
        except aio.AioRpcError as exc:
            self._end(exc)
            raise
        return self._attempt

    async def _retry_or_raise(self, error: aio.AioRpcError) -> None:
        """After a failed attempt: start another if the call is not committed and the
        policy, the budget, the buffer and the deadline all allow it; else fail the call."""
        sub = self._sub
        assert sub is not None
        self._end_attempt_span(error)
        classified = self._plan.classifier.classify_error(error)
        self._upstream.record(sub, self._started, classified)
        self._state = self._state.increment(classified, pushback_of(error))
        replay_lost = self._replay is not None and self._replay.overflowed
        if self._committed or replay_lost or not self._state.may_retry:
            self._end(error)
            raise error
        loop = asyncio.get_running_loop()
        delay = self._state.delay_for_next(self._upstream.rng)
        if self._upstream.clock() + delay >= self._deadline:
            self._end(error)
            raise error
        if not self._upstream.budget.try_withdraw():
            self._upstream.budget_exhausted()
            self._end(error)
            raise error
        if delay > 0:
            await asyncio.sleep(delay)
        self._ready = loop.create_task(self._start_attempt(sub))
        await self._current()

    def _attempt_done(self, attempt: Any) -> None:
        """Keeps the status the attempt's server sent, and ends a committed call whose
        stream the caller stopped reading, so that its bulkhead slot and load are given back
        (an uncommitted one ends through its reader)."""
        if attempt is not self._attempt:
            return
        self._sent = _Sent(attempt)
        if self._committed and not self._finished:
            asyncio.get_running_loop().create_task(self._end_from(attempt))

    async def _end_from(self, attempt: Any) -> None:
        code = await attempt.code()
        if code is grpc.StatusCode.OK:
            self._end(None)
        else:
            self._end(self._sent.error_for(_error_of(code, await attempt.details())))

    def _end_attempt_span(self, error: BaseException | None) -> None:
        span, self._attempt_span = self._attempt_span, None
        CallSpans.attempt_ended(span, error)

    def _end(self, error: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._error = error
        self._end_attempt_span(error)
        if self._spans is not None:
            self._spans.ended(error)
        upstream = self._upstream
        if upstream.metrics is not None:
            upstream.call_finished(
                self._plan.full_method, error, upstream.clock() - self._started_at
            )
        if error is None and self._sub is not None:
            self._upstream.record(self._sub, self._started, OK)
        if self._admitted:
            verdict = (
                verdict_of(error, self._plan.classifier)
                if error is not None or self._sub
                else Outcome.NEUTRAL
            )
            self._plan.admission.release(verdict)

    # -- reading ------------------------------------------------------------------------

    async def read(self) -> Any:
        while True:
            attempt = await self._current()
            try:
                message = await attempt.read()
            except aio.AioRpcError as exc:
                error = self._sent.error_for(exc)
                if error is None:  # the server had ended the stream with OK
                    self._end(None)
                    return EOF
                await self._retry_or_raise(error)
                continue
            if message is EOF:
                code = await attempt.code()
                if code is not grpc.StatusCode.OK and not self._committed:
                    error = _error_of(code, await attempt.details())
                    await self._retry_or_raise(error)
                    continue
                self._end(None)
                return message
            self._commit()
            return message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is EOF:
                return
            yield message

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        while True:
            attempt = await self._current()
            try:
                response = await attempt
            except aio.AioRpcError as exc:
                # An OK status whose response grpc.aio dropped cannot be given back: the
                # error stands (None from error_for).
                await self._retry_or_raise(self._sent.error_for(exc) or exc)
                continue
            self._commit()
            self._end(None)
            return response

    def _commit(self) -> None:
        self._committed = True
        if self._replay is not None:
            self._replay.sent.clear()
            self._replay.overflowed = True

    # -- writing ------------------------------------------------------------------------

    async def write(self, request: Any) -> None:
        if self._replay is None or not self._writer_api:
            raise asyncio.InvalidStateError("write() on a call that was given its requests")
        attempt = await self._current()
        self._replay.keep(request)
        try:
            await attempt.write(request)
        except (aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the attempt failed: its reader retries, replaying what was kept

    async def done_writing(self) -> None:
        if self._replay is None or not self._writer_api:
            raise asyncio.InvalidStateError("done_writing() on a call given its requests")
        self._replay.done_writing = True
        attempt = await self._current()
        try:
            await attempt.done_writing()
        except (aio.AioRpcError, asyncio.InvalidStateError):
            pass

    # -- RpcContext and Call --------------------------------------------------------------

    def cancelled(self) -> bool:
        return self._attempt is not None and bool(self._attempt.cancelled())

    def done(self) -> bool:
        return self._finished

    def time_remaining(self) -> float | None:
        return max(self._deadline - self._upstream.clock(), 0.0)

    def cancel(self) -> bool:
        if self._finished:
            return False
        self._ready.cancel()
        cancelled = self._attempt.cancel() if self._attempt is not None else True
        if self._sub is not None:
            self._upstream.record(self._sub, self._started, CANCELLED)
            self._sub = None
        self._finished = True
        self._end_attempt_span(asyncio.CancelledError())
        if self._spans is not None:
            self._spans.ended(asyncio.CancelledError())
        if self._admitted:
            self._plan.admission.release(Outcome.NEUTRAL)
        return bool(cancelled)

    def add_done_callback(self, callback: Any) -> None:
        async def when_done() -> None:
            try:
                attempt = await self._current()
                await attempt.wait_for_connection()
                await attempt.code()
            finally:
                callback(self)

        asyncio.get_running_loop().create_task(when_done())

    async def initial_metadata(self) -> aio.Metadata:
        try:
            attempt = await self._current()
        except aio.AioRpcError as exc:
            return exc.initial_metadata()
        return await attempt.initial_metadata()  # type: ignore[no-any-return]

    async def _status(self) -> aio.AioRpcError | None:
        """How the call ended, as its server said: the error, or None for OK."""
        if isinstance(self._error, aio.AioRpcError):
            return self._error
        try:
            attempt = await self._current()
        except aio.AioRpcError as exc:
            return exc
        code = await attempt.code()
        if code is grpc.StatusCode.OK:
            return None
        error = aio.AioRpcError(
            code,
            await attempt.initial_metadata(),
            await attempt.trailing_metadata(),
            await attempt.details(),
            await attempt.debug_error_string(),
        )
        return self._sent.error_for(error)

    async def trailing_metadata(self) -> aio.Metadata:
        error = await self._status()
        if error is not None:
            return error.trailing_metadata()  # type: ignore[return-value]
        return await self._attempt.trailing_metadata()  # type: ignore[no-any-return]

    async def code(self) -> grpc.StatusCode:
        error = await self._status()
        return grpc.StatusCode.OK if error is None else error.code()

    async def details(self) -> str:
        error = await self._status()
        return "" if error is None else error.details() or ""

    async def wait_for_connection(self) -> None:
        attempt = await self._current()
        await attempt.wait_for_connection()


def _error_of(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details, None)
