"""Traces with real parts: the platform's processes (users, catalog, payments, delivery,
orders, notifications, order-history) export OTLP to a local receiver (the one developers
use), and one PlaceOrder must be one trace across every hop, its checkout saga's steps and
the catalog's retries shown, and on through the events it caused (publish, then process) to
each consumer's effect."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler

import mesh
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.telemetry.receiver import SpanRecord, TraceReceiver
from mesh.telemetry.tracing import tracing_to
from tests.integration.conftest import FAILING, Stack, order

PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"
GET_ITEM = "foodmesh.catalog.v1.CatalogService/GetItem"
AUTHORIZE = "foodmesh.payments.v1.PaymentService/AuthorizePayment"
SCHEDULE = "foodmesh.delivery.v1.DeliveryService/ScheduleDelivery"
CAPTURE = "foodmesh.payments.v1.PaymentService/CapturePayment"
SERVED = {
    "orders": PLACE_ORDER,
    "users": "foodmesh.users.v1.UserService/GetUser",
    "catalog": GET_ITEM,
    "payments": CAPTURE,
    "delivery": SCHEDULE,
}
"""A server span each service has in every PlaceOrder trace."""
STEPS = {
    "saga step authorize_payment": AUTHORIZE,
    "saga step schedule_delivery": SCHEDULE,
    "saga step capture_payment": CAPTURE,
}
"""The checkout saga's steps, in their order, and the call each makes."""


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
    platform = stack.start_platform(
        env=export, orders_args=("--policy", str(_round_robin(stack)))
    )  # waits for the failing catalog too
    (healthy,), (orders,) = platform["catalog"], platform["orders"]
    customer = stack.customer()

    tracing = tracing_to(receiver.endpoint, Resource.create({"service.name": "shop"}))
    try:
        async with mesh.channel("orders", consul=stack.settings, tracing=tracing) as channel:
            stub = orders_pb2_grpc.OrderServiceStub(channel)
            for n in range(4):  # round robin in orders: some start on the failing catalog
                placed = await stub.PlaceOrder(order(f"traced-{n}", customer=customer), timeout=10)
                assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
    finally:
        # the exporter blocks while it sends: off the loop, which serves the receiver
        await asyncio.to_thread(tracing.shutdown)

    def complete(spans: list[SpanRecord]) -> bool:
        # Every PlaceOrder's trace, not just enough spans overall: the six processes export
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
            if s.kind == "SERVER" and named(s, SERVED.get(s.service_name, ""))
        }
        steps = {(s.trace_id, s.name) for s in spans if s.service_name == "orders"}
        return len(roots) == 4 and all(
            all((root.trace_id, service) in servers for service in SERVED)
            and all((root.trace_id, step) in steps for step in STEPS)
            for root in roots
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
    assert all(
        {s.service_name for s in traces[c.trace_id]} == {"shop", *SERVED} for c in shop_calls
    ), "every trace crosses shop -> orders -> users, catalog, payments and delivery"

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
        checkout_is_under_place_order(trace, server)
    assert retried >= 1, "a retry shows as two attempt spans under one call span"
    placed_lines = [line for line in orders.log().splitlines() if "placed order" in line]
    assert len(placed_lines) == 4
    assert {c.trace_id for c in shop_calls} == {
        line.split(" trace=")[1].split()[0] for line in placed_lines
    }, "a log line written while serving a call carries that call's trace id"
    assert not [s for s in spans if "grpc.health" in s.name], "health checks make no spans"


async def test_one_trace_runs_from_place_order_through_its_events_to_each_consumers_effect(
    stack: Stack, receiver: TraceReceiver
) -> None:
    stack.start_nats()
    export = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    stack.start("notifications", env=export)
    stack.start("order-history", env=export)
    stack.start_platform(env=export)
    stack.wait_passing("notifications", 1)
    stack.wait_passing("order-history", 1)
    customer = stack.customer()
    tracing = tracing_to(receiver.endpoint, Resource.create({"service.name": "shop"}))
    try:
        async with mesh.channel("orders", consul=stack.settings, tracing=tracing) as channel:
            placed = await orders_pb2_grpc.OrderServiceStub(channel).PlaceOrder(
                order("traced-events", customer=customer), timeout=10
            )
    finally:
        await asyncio.to_thread(tracing.shutdown)
    assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
    confirmed = "orders.events.OrderConfirmed"
    assigned = "delivery.events.CourierAssigned"
    wanted = {
        ("orders", f"publish {confirmed}"),
        ("notifications", f"process {confirmed}"),
        ("order-history", f"process {confirmed}"),
        ("delivery", f"publish {assigned}"),  # under orders' ScheduleDelivery call
        ("order-history", f"process {assigned}"),
    }

    def root_of(spans: list[SpanRecord]) -> SpanRecord | None:
        roots = [s for s in spans if s.service_name == "shop" and named(s, PLACE_ORDER)]
        return roots[0] if roots else None

    def complete(spans: list[SpanRecord]) -> bool:
        root = root_of(spans)
        return root is not None and wanted <= {
            (s.service_name, s.name) for s in spans if s.trace_id == root.trace_id
        }

    spans = await receiver.wait_for(complete, timeout=30)
    root = root_of(spans)
    assert root is not None
    trace = receiver.traces()[root.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert not [s for s in trace if s.parent_span_id and s.parent_span_id not in by_id], (
        "every parent is in the trace"
    )
    for service, name in wanted:
        (span,) = [s for s in trace if (s.service_name, s.name) == (service, name)]
        if name.startswith("publish"):
            assert span.kind == "PRODUCER"
            assert span.attributes["messaging.system"] == "nats"
            assert span.attributes["messaging.destination.name"] == name.split()[1]
        else:
            # The consumer's effect is a child of the publish that carried its event.
            assert span.kind == "CONSUMER"
            publish = by_id[span.parent_span_id]
            assert (publish.kind, publish.name) == ("PRODUCER", f"publish {name.split()[1]}")
            assert span.attributes["messaging.consumer.group.name"] == service
            assert span.start_ns >= publish.start_ns


def checkout_is_under_place_order(trace: list[SpanRecord], server: SpanRecord) -> None:
    """The saga's steps are spans of orders under its PlaceOrder server span, one after the
    other, each above the server span of the payments or delivery call it makes."""
    by_id = {s.span_id: s for s in trace}

    def ancestors(span: SpanRecord) -> list[SpanRecord]:
        found = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            found.append(span)
        return found

    steps = sorted((s for s in trace if s.name in STEPS), key=lambda s: s.start_ns)
    assert [s.name for s in steps] == list(STEPS), "a span per step, in order, none retried"
    for earlier, later in itertools.pairwise(steps):
        assert later.start_ns >= earlier.end_ns, "a step starts once the one before it ended"
    for step in steps:
        assert step.service_name == "orders" and server in ancestors(step)
        assert step.attributes["saga.name"] == "checkout"
        (called,) = [
            s
            for s in trace
            if s.kind == "SERVER" and named(s, STEPS[step.name]) and step in ancestors(s)
        ]
        assert called.service_name == ("delivery" if "delivery" in step.name else "payments")
        assert called.status_code != "ERROR"


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
    stack.start_platform(env=export)
    customer = stack.customer()

    async def place(sampler: Sampler | None, key: str) -> str:
        tracing = tracing_to(
            receiver.endpoint, Resource.create({"service.name": "shop"}), sampler=sampler
        )
        try:
            async with mesh.channel("orders", consul=stack.settings, tracing=tracing) as channel:
                stub = orders_pb2_grpc.OrderServiceStub(channel)
                with tracing.tracer.start_as_current_span("checkout") as span:
                    await stub.PlaceOrder(order(key, customer=customer), timeout=10)
                    return f"{span.get_span_context().trace_id:032x}"
        finally:
            await asyncio.to_thread(tracing.shutdown)

    async with mesh.channel("orders", consul=stack.settings) as untraced:  # no trace at all
        await orders_pb2_grpc.OrderServiceStub(untraced).PlaceOrder(
            order("plain", customer=customer), timeout=10
        )
    dropped = await place(ALWAYS_OFF, "unsampled")
    kept = await place(ALWAYS_ON, "sampled")

    def kept_from_all(spans: list[SpanRecord]) -> bool:
        # each process's server span of the kept trace (payments' is the saga's last call)
        served = {
            (s.service_name, s.name.lstrip("/"))
            for s in spans
            if s.trace_id == kept and s.kind == "SERVER"
        }
        return served >= set(SERVED.items())

    spans = await receiver.wait_for(kept_from_all, timeout=30)
    # each process exports in order, so anything of the earlier calls would be here by now
    assert {s.trace_id for s in spans} == {kept}, "only the sampled caller's trace exists"
    assert not [s for s in spans if s.trace_id == dropped]
