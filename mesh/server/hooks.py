"""Server interceptors that run a hook around every servicer behavior.

grpc.aio's ServerInterceptor sees only the method name and metadata, not the call's context
(its deadline, abort); code that needs the context (mesh/core/deadline.py's DeadlineInterceptor,
mesh/resilience/faults.py's FaultInterceptor) has to wrap the RpcMethodHandler's behavior function
instead. This module does that once for all four call shapes: it keeps the serializers, and
wraps a streaming response's async generator so that the hook's context lasts for the whole
stream.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc import aio

if TYPE_CHECKING:  # generic only in grpc-stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor: TypeAlias = aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _ServerInterceptor = aio.ServerInterceptor
Exit = Callable[[], None]
Hook = Callable[[aio.ServicerContext[Any, Any]], Awaitable[Exit | None]]
"""Runs before a servicer's behavior; may abort the call; may return a callback run after
the behavior (or its response stream) has finished."""


def wrap_handler(handler: Handler, hook: Hook) -> Handler:
    """`handler` with its behavior wrapped by `hook`; serializers kept.

    Async behaviors (coroutine functions, async generator functions) are wrapped with the
    same shape, since grpc.aio tells them apart by it. A sync behavior on an aio server runs
    on a thread pool, out of reach of the call's context; it is returned unchanged.
    """
    if handler.request_streaming:
        if handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    wrapped = _wrap_behavior(behavior, hook)
    if wrapped is behavior:
        return handler
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _wrap_behavior(behavior: Any, hook: Hook) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def stream(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            done = await hook(context)
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                if done is not None:
                    done()

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            done = await hook(context)
            try:
                return await behavior(request, context)
            finally:
                if done is not None:
                    done()

        return call
    return behavior


class BehaviorInterceptor(_ServerInterceptor):
    """A server interceptor that runs a hook around every servicer behavior.

    Subclasses say, once per method, which hook to run (`hook_for`; None passes the method
    through untouched). Wrapped handlers are cached per method, so a call costs one dict
    lookup and an identity check on top of the hook.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    @abc.abstractmethod
    def hook_for(self, method: str) -> Hook | None:
        """The hook for every call of `method` (asked once per method), or None."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        hook = self.hook_for(method)
        wrapped = handler if hook is None else wrap_handler(handler, hook)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
