"""Every call shape is traced end to end through the mesh: call span -> attempt span (the
gRPC client span) -> gRPC server span. Streaming servicers are async generators, which the
aio server interceptor handles (opentelemetry-python-contrib#3066 concerns context.write)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mesh import MeshChannel
from mesh.server.deadline import DeadlineInterceptor
from mesh.telemetry.tracing import Tracing
from mesh.testing import ChannelFor


async def unary(request: bytes, context: aio.ServicerContext) -> bytes:
    return request


async def server_stream(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
    for part in (b"a", b"b"):
        yield part


async def client_stream(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
    return b"".join([r async for r in requests])


async def bidi(
    requests: AsyncIterator[bytes], context: aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request.upper()


@pytest.fixture
async def traced() -> AsyncIterator[tuple[MeshChannel, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, provider.get_tracer("test"))
    shapes = grpc.method_handlers_generic_handler(
        "test.Shapes",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    interceptors = [tracing.server_interceptor(), DeadlineInterceptor()]
    async with ChannelFor(
        shapes, service="shapes", tracing=tracing, interceptors=interceptors
    ) as channel:
        yield channel, exporter


def chain(spans: list[ReadableSpan], method: str) -> list[ReadableSpan]:
    """The mesh call span of `method` and its descendants, one per level."""
    (call,) = [s for s in spans if s.name == method and s.kind == SpanKind.INTERNAL]
    found = [call]
    while True:
        below = [s for s in spans if s.parent and s.parent.span_id == found[-1].context.span_id]
        if not below:
            return found
        assert len(below) == 1, [s.name for s in below]
        found.append(below[0])


async def test_each_call_shape_is_one_chain_of_spans(
    traced: tuple[MeshChannel, InMemorySpanExporter],
) -> None:
    channel, exporter = traced
    assert await channel.unary_unary("/test.Shapes/Unary")(b"u") == b"u"
    assert [m async for m in channel.unary_stream("/test.Shapes/ServerStream")(b"s")] == [
        b"a",
        b"b",
    ]

    def parts() -> Iterator[bytes]:
        yield from (b"x", b"y")

    assert await channel.stream_unary("/test.Shapes/ClientStream")(parts()) == b"xy"
    chat = channel.stream_stream("/test.Shapes/Bidi")()
    await chat.write(b"hi")
    assert await chat.read() == b"HI"
    await chat.done_writing()
    assert [m async for m in chat] == []

    spans = list(exporter.get_finished_spans())
    for method in ("Unary", "ServerStream", "ClientStream", "Bidi"):
        call, attempt, server = chain(spans, f"test.Shapes/{method}")
        assert attempt.name == f"test.Shapes/{method}" and attempt.attributes["mesh.attempt"] == 1
        assert attempt.kind == SpanKind.CLIENT and server.kind == SpanKind.SERVER
        assert server.name == f"/test.Shapes/{method}"
        assert {s.context.trace_id for s in (call, attempt, server)} == {
            call.context.trace_id
        }
        assert call.attributes["rpc.grpc.status_code"] == 0
