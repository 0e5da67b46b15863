"""The mesh's call and attempt spans, with the SDK's in-memory exporter and real in-process
servers: one call span per call, one attempt span (the gRPC CLIENT span) per attempt, the
server span under it (traceparent crossed the wire), health checks untraced, an unsampled call
unsampled downstream too."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh import MeshChannel
from mesh.discovery import StaticResolver
from mesh.policy import MethodPolicy, ServicePolicy
from mesh.server import MeshServer, ServerConfig
from mesh.telemetry.tracing import Tracing


class FlakyCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def GetItem(
        self, request: catalog_pb2.GetItemRequest, context: aio.ServicerContext
    ) -> catalog_pb2.Item:
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "flaky is down")
        return catalog_pb2.Item(item_id=request.item_id, name="ok")


@pytest.fixture
def exported() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, provider.get_tracer("test")), exporter


@pytest.fixture
async def servers(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> AsyncIterator[list[MeshServer]]:
    tracing, _ = exported
    started = []
    for fail in (True, False):
        server = MeshServer(ServerConfig("catalog", register=False, drain_delay=0), tracing=tracing)
        server.add_service(
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
            catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
            FlakyCatalog(fail),
        )
        await server.start()
        started.append(server)
    yield started
    for server in started:
        await server.stop()


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_retried_call_has_two_attempts_under_one_call_span(
    servers: list[MeshServer], exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = exported
    flaky, healthy = servers
    policy = ServicePolicy(balancer="round_robin", defaults=MethodPolicy(idempotent=True))
    resolver = StaticResolver({"catalog": [s.address for s in servers]})
    async with MeshChannel("catalog", resolver, policy=policy, tracing=tracing) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for _ in range(2):  # round robin: one of the two starts on the failing instance
            assert (await stub.GetItem(catalog_pb2.GetItemRequest(item_id="x"))).name == "ok"

    spans = exporter.get_finished_spans()
    calls = by_name(spans, "foodmesh.catalog.v1.CatalogService/GetItem")
    mesh_calls = [s for s in calls if s.attributes.get("mesh.service") == "catalog"]
    assert len(mesh_calls) == 2
    retried = next(
        c
        for c in mesh_calls
        if len([s for s in spans if s.parent and s.parent.span_id == c.context.span_id]) == 2
    )
    attempts = sorted(
        (s for s in spans if s.parent and s.parent.span_id == retried.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    assert [a.attributes["mesh.attempt"] for a in attempts] == [1, 2]
    for attempt in attempts:
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.name == "foodmesh.catalog.v1.CatalogService/GetItem"
        assert attempt.attributes["rpc.system"] == "grpc"
        assert attempt.attributes["rpc.method"] == "GetItem"
    first, second = attempts
    assert first.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert first.status.status_code == StatusCode.ERROR and "flaky is down" in (
        first.status.description or ""
    )
    assert first.attributes["mesh.retry"] is False and second.attributes["mesh.retry"] is True
    assert first.attributes["server.port"] == flaky.port
    assert second.attributes["server.port"] == healthy.port
    assert retried.attributes["rpc.grpc.status_code"] == 0
    assert {
        s.context.trace_id for s in spans if s.context.trace_id == retried.context.trace_id
    } and all(a.context.trace_id == retried.context.trace_id for a in attempts)
    # the server's span hangs under the attempt that reached it: one per attempt
    for attempt in attempts:
        below = [s for s in spans if s.parent and s.parent.span_id == attempt.context.span_id]
        assert [s.kind for s in below] == [SpanKind.SERVER], [s.name for s in below]
    assert not [s for s in spans if "grpc.health" in s.name], "health checks are not traced"


async def test_open_circuit_is_an_event_on_the_call_span(
    servers: list[MeshServer], exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = exported
    from mesh.policy import BreakerPolicy
    from mesh.resilience.retry import RetryPolicy

    policy = ServicePolicy(
        breaker=BreakerPolicy(minimum_calls=2, open_time=60.0),
        defaults=MethodPolicy(retry=RetryPolicy(max_attempts=1)),
    )
    resolver = StaticResolver({"catalog": [servers[0].address]})
    async with MeshChannel("catalog", resolver, policy=policy, tracing=tracing) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for _ in range(3):
            with pytest.raises(aio.AioRpcError):
                await stub.GetItem(catalog_pb2.GetItemRequest(item_id="x"))
    calls = [
        s for s in exporter.get_finished_spans() if s.attributes.get("mesh.service") == "catalog"
    ]
    assert len(calls) == 3
    refused = calls[-1]
    assert [e.name for e in refused.events] == ["refused by the mesh"]
    assert "circuit" in str(refused.events[0].attributes["reason"])
    assert refused.status.status_code == StatusCode.ERROR


async def test_unsampled_call_has_no_attempt_spans_and_stays_unsampled_downstream(
    servers: list[MeshServer], exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    """The caller drops the trace (its root sampler says no): the mesh makes no attempt
    spans, and the server, parent-based, follows the sampled flag the call carried."""
    _, exporter = exported
    caller = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    caller.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(caller, caller.get_tracer("caller"))
    resolver = StaticResolver({"catalog": [servers[1].address]})  # the healthy one
    async with MeshChannel("catalog", resolver, tracing=tracing) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        assert (await stub.GetItem(catalog_pb2.GetItemRequest(item_id="x"))).name == "ok"
    assert exporter.get_finished_spans() == ()
    # and the same server does trace a call that comes without a trace (root, always on)
    async with aio.insecure_channel(servers[1].address) as plain:
        await catalog_pb2_grpc.CatalogServiceStub(plain).GetItem(
            catalog_pb2.GetItemRequest(item_id="x")
        )
    assert [s.kind for s in exporter.get_finished_spans()] == [SpanKind.SERVER]


async def test_health_checks_through_a_mesh_channel_make_no_spans(
    servers: list[MeshServer], exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = exported
    resolver = StaticResolver({"catalog": [servers[1].address]})
    async with MeshChannel("catalog", resolver, tracing=tracing) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert exporter.get_finished_spans() == ()
        # while a call of the service itself, on the same channel, is traced
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        await stub.GetItem(catalog_pb2.GetItemRequest(item_id="x"))
    assert {s.kind for s in exporter.get_finished_spans()} == {
        SpanKind.INTERNAL,
        SpanKind.CLIENT,
        SpanKind.SERVER,
    }
