"""The gateway's gRPC router: any method of any service in the mesh, forwarded as bytes.

A grpc.GenericRpcHandler answers every method the gateway does not serve itself (health and
reflection are its own). It reads the service name from the call's path
(`/foodmesh.catalog.v1.CatalogService/GetItem`), finds the Consul service that serves it in
the route table (meshkit/gateway/routes.py) and forwards the call on that service's mesh
channel, so that the mesh's balancing, retries, breakers and deadlines apply. Messages pass as
raw bytes: neither the handler nor the channel has a (de)serializer, so the gateway never
parses a message on this path.

The call's shape comes from the service's descriptors (meshkit/gateway/descriptors.py), so
that a unary call stays unary (and retryable) on the mesh; a method whose descriptors are not
known yet is forwarded as a bidirectional stream, which carries any of the four shapes on the
wire.

Metadata: the client's goes on minus what belongs to one hop (HTTP/2 connection headers,
`grpc-*`, `content-type`, `user-agent`), minus what the gateway owns (`authorization`, which
it has verified, and `x-user-id`, which only it may set), and minus the trace context when
the gateway traces (its own span continues the trace and is what it sends on). It adds
`x-request-id` when the client sent none (and returns it: in the trailers of a unary answer
or a failed call, in the headers of a stream), `x-forwarded-for`, and the verified
`x-user-id`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
from grpc import aio

from mesh.core.errors import RefusedByMesh
from mesh.server.hooks import Handler
from meshkit.gateway.calls import LOOPBACK_PEER, REQUEST_ID, call_of
from meshkit.gateway.routes import EMPTY, RouteTable

if TYPE_CHECKING:  # generic only in grpc-stubs
    _GenericHandler: TypeAlias = grpc.GenericRpcHandler[Any, Any]
else:
    _GenericHandler = grpc.GenericRpcHandler
log = logging.getLogger(__name__)

USER_ID = "x-user-id"
FORWARDED_FOR = "x-forwarded-for"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-type",
        "content-length",
        "user-agent",
    }
)
GATEWAY_OWNED = frozenset({"authorization", USER_ID, LOOPBACK_PEER})
TRACE_CONTEXT = frozenset({"traceparent", "tracestate", "baggage"})

ChannelFor = Callable[[str], aio.Channel]
ShapeOf = Callable[[str], str | None]
Metadata = tuple[tuple[str, str | bytes], ...]


def service_of(method: str) -> str:
    """`pkg.Service` of `/pkg.Service/Method` (or of a malformed path, its first part)."""
    return method.lstrip("/").partition("/")[0]


class Router(_GenericHandler):
    """Forwards every call it is asked about to the service the route table names."""

    def __init__(
        self,
        channel_for: ChannelFor,
        shape_of: ShapeOf = lambda method: None,
        *,
        strip_trace_context: bool = True,
    ) -> None:
        self._channel_for = channel_for
        self._shape_of = shape_of
        self._drop = HOP_BY_HOP | GATEWAY_OWNED | (TRACE_CONTEXT if strip_trace_context else set())
        self.table: RouteTable = EMPTY
        self._handlers: dict[tuple[str, str, str], Handler] = {}

    def knows(self, method: str) -> bool:
        """Whether the call's service is in the route table now."""
        return self.table.get(service_of(method)) is not None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        method = handler_call_details.method
        grpc_service = service_of(method)
        route = self.table.get(grpc_service)
        if route is None:
            return _refusal(
                grpc.StatusCode.UNIMPLEMENTED,
                f"unknown service {grpc_service!r}: no service in the mesh serves it",
            )
        shape = self._shape_of(method) or "stream_stream"
        key = (method, route.consul_service, shape)
        handler = self._handlers.get(key)
        if handler is None:
            if len(self._handlers) > 10_000:  # a client inventing method names
                self._handlers.clear()
            handler = self._forwarder(method, grpc_service, route.consul_service, shape)
            self._handlers[key] = handler
        return handler

    # -- forwarding ---------------------------------------------------------------------

    def _outbound(self, context: aio.ServicerContext[Any, Any]) -> tuple[str, Metadata]:
        inbound = context.invocation_metadata() or ()
        drop = self._drop
        kept = [
            (key, value)
            for key, value in inbound
            if key not in drop and not key.startswith(("grpc-", ":"))
        ]
        call = call_of(context)
        rid = call.request_id
        kept = [(k, v) for k, v in kept if k != REQUEST_ID]
        kept.append((REQUEST_ID, rid))
        peer = call.peer
        if peer:
            forwarded = [str(v) for k, v in kept if k == FORWARDED_FOR]
            kept = [(k, v) for k, v in kept if k != FORWARDED_FOR]
            kept.append((FORWARDED_FOR, ", ".join([*forwarded, peer])))
        if call.user is not None:
            kept.append((USER_ID, call.user))
        return rid, tuple(kept)

    def _forwarder(
        self, method: str, grpc_service: str, consul_service: str, shape: str
    ) -> Handler:
        channel = self._channel_for(consul_service)
        start = getattr(channel, shape)(method)  # no serializers: bytes in, bytes out
        outbound = self._outbound

        async def relay_headers(call: Any, context: Any, rid: str) -> None:
            headers = _response_metadata(await call.initial_metadata())
            await context.send_initial_metadata((*headers, (REQUEST_ID, rid)))

        async def fail(context: Any, error: aio.AioRpcError, rid: str) -> NoReturn:
            details = error.details() or ""
            if isinstance(error, RefusedByMesh):  # the mesh refused; no backend answered
                details = f"{grpc_service}: {details}"
            trailers = (*_response_metadata(error.trailing_metadata()), (REQUEST_ID, rid))
            await context.abort(error.code(), details, trailers)
            raise AssertionError("unreachable: abort() raises")

        if not shape.endswith("_stream"):

            async def unary_response(request: Any, context: Any) -> bytes:
                rid, metadata = outbound(context)
                call = start(request, metadata=metadata)
                try:
                    response: bytes = await call
                    # The request id goes back in the trailers: sending headers apart is
                    # one more write per call, which only a backend's own headers justify.
                    headers = _response_metadata(await call.initial_metadata())
                    if headers:
                        await context.send_initial_metadata(headers)
                    trailers = _response_metadata(await call.trailing_metadata())
                    context.set_trailing_metadata((*trailers, (REQUEST_ID, rid)))
                    return response
                except aio.AioRpcError as error:
                    await fail(context, error, rid)
                except asyncio.CancelledError:
                    call.cancel()
                    raise

            factory = (
                grpc.unary_unary_rpc_method_handler
                if shape == "unary_unary"
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(unary_response)

        async def stream_response(request: Any, context: Any) -> AsyncIterator[bytes]:
            rid, metadata = outbound(context)
            call = start(request, metadata=metadata)
            try:
                await relay_headers(call, context, rid)
                async for response in call:
                    yield response
                context.set_trailing_metadata(_response_metadata(await call.trailing_metadata()))
            except aio.AioRpcError as error:
                await fail(context, error, rid)
            finally:
                call.cancel()  # a client gone away, or an error: stop the backend's stream

        factory = (
            grpc.unary_stream_rpc_method_handler
            if shape == "unary_stream"
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(stream_response)


def _response_metadata(metadata: Any) -> Metadata:
    """A backend's response headers or trailers, less what gRPC itself writes."""
    return tuple(
        (key, value)
        for key, value in (metadata or ())
        if key not in HOP_BY_HOP and not (key.startswith((":", "grpc-")) and key != _STATUS_BIN)
    )


_STATUS_BIN = "grpc-status-details-bin"


def _refusal(code: grpc.StatusCode, message: str) -> Handler:
    """A handler that fails the call at once: a bidirectional stream, which reads nothing,
    whatever the method's shape (the wire does not tell them apart)."""

    async def refuse(requests: Any, context: Any) -> AsyncIterator[bytes]:
        await context.abort(code, message)
        yield b""  # pragma: no cover - an async generator, as grpc.aio needs

    return grpc.stream_stream_rpc_method_handler(refuse)
