"""Traces with real parts: catalog and orders processes export OTLP to a local receiver (the
one developers use), and one PlaceOrder must be one trace across both hops, retries shown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler

import mesh
from foodmesh.orders.v1 import orders_pb2_grpc
from mesh.telemetry.receiver import SpanRecord, TraceReceiver
from mesh.telemetry.tracing import tracing_to
from tests.integration.conftest import FAILING, Stack, order

PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"
GET_ITEM = "foodmesh.catalog.v1.CatalogService/GetItem"


@pytest.fixture
async def receiver() -> AsyncIterator[TraceReceiver]:
    running = TraceReceiver()
    await running.start()
    yield running
    await running.stop()


def named(span: SpanRecord, method: str) -> bool:
    return span.name.lstrip("/") == method


def children(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return sorted(
        (s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_ns
    )


async def test_place_order_is_one_trace_across_orders_and_catalog(
    stack: Stack, receiver: TraceReceiver
) -> None:
    export = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    failing = stack.start("catalog", *FAILING, env=export)
    healthy = stack.start("catalog", env=export)
    orders = stack.start("orders", "--policy", str(_round_robin(stack)), env=export)
    stack.wait_passing("catalog", 2)
    stack.wait_passing("orders", 1)

    tracing = tracing_to(receiver.endpoint, Resource.create({"service.name": "shop"}))
    try:
        async with mesh.channel("orders", consul=stack.settings, tracing=tracing) as channel:
            stub = orders_pb2_grpc.OrderServiceStub(channel)
            for n in range(4):  # round robin in orders: some start on the failing catalog
                await stub.PlaceOrder(order(f"traced-{n}"), timeout=10)
    finally:
        # the exporter blocks while it sends: off the loop, which serves the receiver
        await asyncio.to_thread(tracing.shutdown)

    def complete(spans: list[SpanRecord]) -> bool:
        # Every PlaceOrder's trace, not just enough spans overall: the three processes export
        # on their own schedules. gRPC's own spans are named by the path ("/pkg.Service/M"),
        # the mesh's by OpenTelemetry's RPC convention ("pkg.Service/M").
        roots = [
            s
            for s in spans
            if s.service_name == "shop" and s.kind == "INTERNAL" and named(s, PLACE_ORDER)
        ]
        servers = {
            (s.trace_id, s.service_name)
            for s in spans
            if s.kind == "SERVER" and (named(s, PLACE_ORDER) or named(s, GET_ITEM))
        }
        return len(roots) == 4 and all(
            (root.trace_id, service) in servers
            for root in roots
            for service in ("orders", "catalog")
        )

    spans = await receiver.wait_for(complete, timeout=30)
    shop_calls = [
        s
        for s in spans
        if s.service_name == "shop" and s.name == PLACE_ORDER and s.kind == "INTERNAL"
    ]
    assert len(shop_calls) == 4
    assert len({s.trace_id for s in shop_calls}) == 4, "one trace per PlaceOrder"
    traces = receiver.traces()
    assert all(len({s.service_name for s in traces[c.trace_id]}) == 3 for c in shop_calls), (
        "every trace crosses shop -> orders -> catalog"
    )

    retried = 0
    for call in shop_calls:
        trace = traces[call.trace_id]
        assert not [
            s
            for s in trace
            if s.parent_span_id and s.parent_span_id not in {p.span_id for p in trace}
        ], "every parent is in the trace"
        (attempt,) = children(trace, call)
        (server,) = children(trace, attempt)
        assert (attempt.kind, server.kind, server.service_name) == ("CLIENT", "SERVER", "orders")
        (catalog_call,) = [
            s
            for s in trace
            if s.service_name == "orders" and s.name == GET_ITEM and s.kind == "INTERNAL"
        ]
        attempts = children(trace, catalog_call)
        assert [a.attributes["mesh.attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
        if len(attempts) == 2:
            retried += 1
            first, second = attempts
            assert first.status_code == "ERROR" and "injected fault" in first.status_message
            assert first.attributes["server.port"] == failing.port
            assert second.attributes["mesh.retry"] is True
            assert second.attributes["server.port"] == healthy.port
            assert second.status_code != "ERROR"
    assert retried >= 1, "a retry shows as two attempt spans under one call span"
    placed = [line for line in orders.log().splitlines() if "placed order" in line]
    assert len(placed) == 4
    assert {c.trace_id for c in shop_calls} == {
        line.split(" trace=")[1].split()[0] for line in placed
    }, "a log line written while serving a call carries that call's trace id"
    assert not [s for s in spans if "grpc.health" in s.name], "health checks make no spans"


def _round_robin(stack: Stack) -> object:
    path = stack.data_dir / "round-robin.toml"
    path.write_text('[services.catalog]\nbalancer = "round_robin"\n')
    return path


async def test_sampling_follows_the_environment_and_the_parent(
    stack: Stack, receiver: TraceReceiver
) -> None:
    # ratio 0 for traces that start here; parent-based: a sampled caller's trace is kept
    export = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    stack.start("catalog", env=export)
    stack.start("orders", env=export)
    stack.wait_passing("catalog", 1)
    stack.wait_passing("orders", 1)

    async def place(sampler: Sampler | None, key: str) -> str:
        tracing = tracing_to(
            receiver.endpoint, Resource.create({"service.name": "shop"}), sampler=sampler
        )
        try:
            async with mesh.channel("orders", consul=stack.settings, tracing=tracing) as channel:
                stub = orders_pb2_grpc.OrderServiceStub(channel)
                with tracing.tracer.start_as_current_span("checkout") as span:
                    await stub.PlaceOrder(order(key), timeout=10)
                    return f"{span.get_span_context().trace_id:032x}"
        finally:
            await asyncio.to_thread(tracing.shutdown)

    async with mesh.channel("orders", consul=stack.settings) as untraced:  # no trace at all
        await orders_pb2_grpc.OrderServiceStub(untraced).PlaceOrder(order("plain"), timeout=10)
    dropped = await place(ALWAYS_OFF, "unsampled")
    kept = await place(ALWAYS_ON, "sampled")

    def kept_from_both(spans: list[SpanRecord]) -> bool:
        return {s.service_name for s in spans if s.trace_id == kept} >= {"orders", "catalog"}

    spans = await receiver.wait_for(kept_from_both, timeout=30)
    # each process exports in order, so anything of the earlier calls would be here by now
    assert {s.trace_id for s in spans} == {kept}, "only the sampled caller's trace exists"
    assert not [s for s in spans if s.trace_id == dropped]
