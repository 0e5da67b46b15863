"""MockChannel: a grpc.aio.Channel that answers the methods it is given, with no server.

    channel = MockChannel((add_CatalogServiceServicer_to_server, FakeCatalog()))
    channel = MockChannel(methods={"/foodmesh.catalog.v1.CatalogService/GetItem": answer})

httpx's MockTransport is the model: the code under test keeps its real client (a generated
stub, or a MeshChannel whose sub-channels are MockChannels: `channel_factory=`), and the
test says what the other side answers. Services (a generated servicer with its add function,
or a generic handler) run as a server would run them: the request is serialized by the
stub's serializer and parsed by the servicer's deserializer, the response the same way back,
so what the servicer gets is what it would get from the wire; `context.abort()`, a code set
on the context, an exception (UNKNOWN) and the call's timeout (DEADLINE_EXCEEDED) end the
call with the status a grpc.aio server would give. `methods` map a full method name to a
function `(request, context) -> response` that gets and returns message objects, no
serialization: the quickest way to script one answer (raising `rpc_error(code, ...)` ends
the call with that status). An unknown method is UNIMPLEMENTED. Every call is recorded in
`calls`.

All four call shapes work: streaming responses are (async) iterables or async generators;
streaming requests reach the handler as an async iterator, from the request iterator or from
`write()` / `done_writing()`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc import aio

from mesh.client.subchannels import CallableKey, MultiCallables
from mesh.testing.services import (
    CallDetails,
    MethodHandler,
    Service,
    find_handler,
    generic_handlers,
)

log = logging.getLogger(__name__)

EOF: Any = aio.EOF  # type: ignore[attr-defined]  # grpc-stubs predate it
Metadata = tuple[tuple[str, str | bytes], ...]
Handler = Callable[[Any, "MockContext"], Any]
"""A scripted method: `(request, context) -> response`, sync or async; for a streaming
response, an iterable or async iterable of responses."""


def rpc_error(
    code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
) -> aio.AioRpcError:
    """The AioRpcError a grpc.aio client sees for a call that ended with `code`."""
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(*trailing_metadata), details, None)


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One call a MockChannel answered (or refused)."""

    method: str
    request: Any
    """The request message; for a streaming request, the list of messages sent."""
    metadata: Metadata
    timeout: float | None


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class MockContext:
    """What a servicer gets as its context: the subset of grpc.aio.ServicerContext that
    servicers use (abort, codes and details, metadata, time remaining)."""

    def __init__(self, method: str, metadata: Metadata, timeout: float | None) -> None:
        self.method = method
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> NoReturn:
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise _Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def peer(self) -> str:
        return "mock:0"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def cancelled(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class _Route:
    """How one call is answered: a service's method handler, or a scripted function."""

    handler: MethodHandler | None
    function: Handler | None


class MockChannel(MultiCallables, aio.Channel):
    """A channel whose calls are answered by `services` and `methods` in this process."""

    def __init__(self, *services: Service, methods: Mapping[str, Handler] | None = None) -> None:
        self._handlers = generic_handlers(services)
        self._methods = {f"/{name.lstrip('/')}": fn for name, fn in (methods or {}).items()}
        self.calls: list[RecordedCall] = []
        self.closed = False
        self._closing = asyncio.Event()

    def _route(self, method: str, metadata: Metadata) -> _Route | None:
        function = self._methods.get(method)
        if function is not None:
            return _Route(None, function)
        handler = find_handler(self._handlers, CallDetails(method, metadata))
        return _Route(handler, None) if handler is not None else None

    def _multicallable(self, key: CallableKey) -> Callable[..., Any]:
        def call(
            request: Any = None,
            timeout: float | None = None,
            metadata: Any = None,
            credentials: Any = None,
            wait_for_ready: Any = None,
            compression: Any = None,
        ) -> _MockCall:
            return _MockCall(self, key, request, timeout, tuple(metadata or ()))

        return call

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        if self.closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        return grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        if self.get_state() == last_observed_state:
            await self._closing.wait()  # READY until closed: the one change there is

    async def channel_ready(self) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        self.closed = True
        self._closing.set()

    async def __aenter__(self) -> MockChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _MockCall(
    aio.UnaryUnaryCall[Any, Any],
    aio.UnaryStreamCall[Any, Any],
    aio.StreamUnaryCall[Any, Any],
    aio.StreamStreamCall[Any, Any],
):
    """The call object of every shape: the handler runs in a task from the start, as a
    grpc.aio call is on its way when the stub returns."""

    def __init__(
        self,
        channel: MockChannel,
        key: CallableKey,
        request: Any,
        timeout: float | None,
        metadata: Metadata,
    ) -> None:
        shape, method = key.shape, key.method
        self._shape = shape
        self._serialize = key.request_serializer or _same
        self._deserialize = key.response_deserializer or _same
        self._written: asyncio.Queue[Any] | None = None
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._sent: list[Any] = []
        self._error: aio.AioRpcError | None = None
        self._response: Any = None
        self._trailing: Metadata = ()
        request_streaming = shape.startswith("stream_")
        if request_streaming and request is None:
            self._written = asyncio.Queue()
        recorded = self._sent if request_streaming else request
        channel.calls.append(RecordedCall(method, recorded, metadata, timeout))
        route = channel._route(method, metadata)
        self._task = asyncio.get_running_loop().create_task(
            self._run(route, method, request, metadata, timeout)
        )

    # -- running the handler ----------------------------------------------------------------

    async def _run(
        self,
        route: _Route | None,
        method: str,
        request: Any,
        metadata: Metadata,
        timeout: float | None,
    ) -> None:
        context = MockContext(method, metadata, timeout)
        try:
            if route is None:
                raise _Aborted(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            answer = self._answer(route, request, context)
            if timeout is None:
                await answer
            else:
                try:
                    await asyncio.wait_for(answer, timeout)
                except TimeoutError:
                    raise _Aborted(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            code = context.code()
            if code is not None and code is not grpc.StatusCode.OK:
                raise _Aborted(code, context.details())
        except _Aborted as aborted:
            self._error = rpc_error(aborted.code, aborted.details, context.trailing_metadata())
        except aio.AioRpcError as error:
            self._error = error  # a scripted method's way to end with a status
        except asyncio.CancelledError:
            self._error = rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
            raise
        except Exception as exc:
            self._error = rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")
        finally:
            self._trailing = context.trailing_metadata()
            self._responses.put_nowait(EOF)

    async def _answer(self, route: _Route, request: Any, context: MockContext) -> None:
        handler = route.handler
        if route.function is not None:
            wire_in: Callable[[Any], Any] = _same
            wire_out: Callable[[Any], Any] = _same
            behavior = route.function
        else:
            assert handler is not None
            behavior = _behavior(handler)
            parse = handler.request_deserializer or _same
            dump = handler.response_serializer or _same
            wire_in = lambda message: parse(self._to_wire(message))  # noqa: E731
            wire_out = lambda message: self._deserialize(dump(message))  # noqa: E731
        if self._shape.startswith("stream_"):
            argument: Any = _mapped(self._requests(request), wire_in)
        else:
            argument = wire_in(request)
        result = behavior(argument, context)
        if self._shape.endswith("_stream"):
            async for message in _each(result):
                self._responses.put_nowait(wire_out(message))
        else:
            self._response = wire_out(await result if inspect.isawaitable(result) else result)

    def _to_wire(self, message: Any) -> Any:
        """As grpc.aio serializes: a request its serializer refuses is logged and sent as an
        empty message (grpc/_common.py), which the servicer then parses."""
        try:
            return self._serialize(message)
        except Exception:
            log.exception("Exception serializing message!")
            return b""

    async def _requests(self, given: Any) -> AsyncIterator[Any]:
        if self._written is not None:
            while (message := await self._written.get()) is not EOF:
                self._sent.append(message)
                yield message
            return
        async for message in _each(given):
            self._sent.append(message)
            yield message

    # -- the call object --------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        await self._task
        if self._error is not None:
            raise self._error
        return self._response

    async def read(self) -> Any:
        message = await self._responses.get()
        if message is EOF:
            self._responses.put_nowait(EOF)
            await asyncio.shield(self._task)
            if self._error is not None:
                raise self._error
        return message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not EOF:
            yield message

    async def write(self, request: Any) -> None:
        if self._written is None:
            raise asyncio.InvalidStateError("write() on a call that was given its requests")
        self._written.put_nowait(request)

    async def done_writing(self) -> None:
        if self._written is None:
            raise asyncio.InvalidStateError("done_writing() on a call given its requests")
        self._written.put_nowait(EOF)

    async def _ended(self) -> None:
        await asyncio.wait([self._task])

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return self._task.cancel()

    def add_done_callback(self, callback: Any) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> aio.Metadata:
        return aio.Metadata()

    async def trailing_metadata(self) -> aio.Metadata:
        await self._ended()
        return aio.Metadata(*self._trailing)

    async def code(self) -> grpc.StatusCode:
        await self._ended()
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        return self._error.code() if self._error is not None else grpc.StatusCode.OK

    async def details(self) -> str:
        await self._ended()
        return (self._error.details() or "") if self._error is not None else ""

    async def wait_for_connection(self) -> None:
        return None


def _same(message: Any) -> Any:
    return message


def _behavior(handler: MethodHandler) -> Callable[[Any, Any], Any]:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    return behavior


async def _each(messages: Any) -> AsyncIterator[Any]:
    """The messages of an async iterable, an iterable, or an awaitable of either."""
    if inspect.isawaitable(messages):
        messages = await messages
    if messages is None:
        return
    if hasattr(messages, "__aiter__"):
        async for message in messages:
            yield message
    else:
        for message in messages if isinstance(messages, Iterable) else ():
            yield message


async def _mapped(
    messages: AsyncIterator[Any], function: Callable[[Any], Any]
) -> AsyncIterator[Any]:
    async for message in messages:
        yield function(message)
