"""A call object for an RPC that cannot start yet (or must fail without starting).

grpc.aio stubs return a call object synchronously, but the mesh sometimes has to wait before
it can choose an endpoint (discovery has not answered yet) or has to fail the call with a
status of its own (no healthy endpoint). DeferredCall is that call object: it implements the
four grpc.aio call interfaces on top of a task that produces the real call, so `await call`,
`async for`, `read()`, `write()`, `code()` and `cancel()` behave as they do on a plain
grpc.aio channel. The fast path (an endpoint is known) never uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, cast

import grpc
from grpc import aio

AnyCall = Any  # one of the four grpc.aio call types; their type parameters do not help here


class DeferredCall(
    aio.UnaryUnaryCall[Any, Any],
    aio.UnaryStreamCall[Any, Any],
    aio.StreamUnaryCall[Any, Any],
    aio.StreamStreamCall[Any, Any],
):
    """A grpc.aio call whose real call is produced by the coroutine `start`.

    If `start` raises AioRpcError, the call fails with it: every await raises it and
    code()/details()/metadata report it.
    """

    def __init__(self, start: Coroutine[Any, Any, AnyCall], deadline: float | None) -> None:
        self._task: asyncio.Task[AnyCall] = asyncio.get_running_loop().create_task(start)
        self._deadline = deadline

    async def _call(self) -> AnyCall:
        return await asyncio.shield(self._task)

    def _started(self) -> AnyCall | None:
        task = self._task
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        return None

    def _failure(self) -> aio.AioRpcError | None:
        task = self._task
        if task.done() and not task.cancelled():
            exc = task.exception()
            if isinstance(exc, aio.AioRpcError):
                return exc
        return None

    # -- RpcContext ---------------------------------------------------------------------

    def cancelled(self) -> bool:
        call = self._started()
        return call.cancelled() if call is not None else self._task.cancelled()

    def done(self) -> bool:
        call = self._started()
        return call.done() if call is not None else self._task.done()

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - asyncio.get_running_loop().time(), 0.0)

    def cancel(self) -> bool:
        call = self._started()
        if call is not None:
            return bool(call.cancel())
        return self._task.cancel()

    def add_done_callback(self, callback: Any) -> None:
        def started(task: asyncio.Task[AnyCall]) -> None:
            call = self._started()
            if call is not None:
                call.add_done_callback(lambda _inner: callback(self))
            else:
                callback(self)

        self._task.add_done_callback(started)

    # -- Call ---------------------------------------------------------------------------

    async def initial_metadata(self) -> aio.Metadata:
        try:
            call = await self._call()
        except aio.AioRpcError as exc:
            return exc.initial_metadata()
        return await call.initial_metadata()  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> aio.Metadata:
        try:
            call = await self._call()
        except aio.AioRpcError as exc:
            return cast(aio.Metadata, exc.trailing_metadata())
        return await call.trailing_metadata()  # type: ignore[no-any-return]

    async def code(self) -> grpc.StatusCode:
        try:
            call = await self._call()
        except aio.AioRpcError as exc:
            return exc.code()
        except asyncio.CancelledError:
            return grpc.StatusCode.CANCELLED
        return await call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        try:
            call = await self._call()
        except aio.AioRpcError as exc:
            return exc.details() or ""
        return await call.details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        call = await self._call()
        await call.wait_for_connection()

    # -- unary response -----------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        call = await self._call()
        return await call

    # -- streaming response -------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        call = await self._call()
        async for response in call:
            yield response

    async def read(self) -> Any:
        call = await self._call()
        return await call.read()

    # -- streaming request --------------------------------------------------------------

    async def write(self, request: Any) -> None:
        call = await self._call()
        await call.write(request)

    async def done_writing(self) -> None:
        call = await self._call()
        await call.done_writing()


async def failed(error: aio.AioRpcError) -> AnyCall:
    """A `start` coroutine for a call that fails with `error` without being sent."""
    raise error
