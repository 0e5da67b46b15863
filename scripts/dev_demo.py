"""The dev stack's demo order: one order placed through the mesh, and how it is shown.

Why: instances that all pass their health checks can still be wired wrong. One real order
proves the whole path works (our process -> Consul -> orders -> Consul -> catalog), the way a
user's app would take it: a mesh channel that finds ``orders`` in Consul. It is traced too, from
our process on, under one root span, so that its trace id can be printed and its waterfall drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource

import mesh
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.discovery import ConsulResolver, ConsulSettings
from mesh.telemetry.tracing import tracing_to
from scripts.dev_console import say
from scripts.dev_processes import StartupFailed
from scripts.dev_traces import ReceiverProcess, waterfall_command

DEMO_CUSTOMER = "dev-stack"
DEMO_LINES = (("roma-margherita", 2), ("roma-carbonara", 1))
DEMO_ORDER_TIMEOUT_S = 15.0
DEMO_SPAN = "dev-stack demo order"


def place_demo_order(
    consul_addr: str, otlp_endpoint: str, orders_logs: Sequence[Path]
) -> tuple[orders_pb2.Order, str]:
    """Place one order through the mesh: orders found in the Consul at ``consul_addr``,
    catalog behind it; traced to ``otlp_endpoint`` ("" for no tracing). Returns the order and
    its trace id ("" when tracing is off); a failed call is a StartupFailed with
    ``orders_logs``."""
    try:
        return asyncio.run(_place_order(consul_addr, otlp_endpoint))
    except grpc.aio.AioRpcError as exc:
        raise StartupFailed(
            f"demo order failed: {exc.code().name}: {exc.details()}", orders_logs
        ) from exc


async def _place_order(consul_addr: str, otlp_endpoint: str) -> tuple[orders_pb2.Order, str]:
    tracing = None
    if otlp_endpoint:
        tracing = tracing_to(otlp_endpoint, Resource.create({"service.name": "dev-stack"}))
    resolver = ConsulResolver(ConsulSettings.parse(consul_addr))
    channel = mesh.channel("orders", resolver=resolver, tracing=tracing)
    try:
        request = orders_pb2.PlaceOrderRequest(
            customer_id=DEMO_CUSTOMER,
            lines=[orders_pb2.OrderLine(item_id=i, quantity=q) for i, q in DEMO_LINES],
            idempotency_key=f"dev-stack-{uuid.uuid4().hex}",
        )
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        # One root span over the call, so that the whole order is one trace we can name.
        root = (
            tracing.tracer.start_as_current_span(DEMO_SPAN)
            if tracing is not None
            else contextlib.nullcontext()
        )
        with root as span:
            order: orders_pb2.Order = await stub.PlaceOrder(request, timeout=DEMO_ORDER_TIMEOUT_S)
        trace_id = "" if span is None else trace.format_trace_id(span.get_span_context().trace_id)
        return order, trace_id
    finally:
        await channel.close()
        await resolver.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # flushes; the exporter blocks


def show_order(order: orders_pb2.Order, trace_id: str, receiver: ReceiverProcess | None) -> None:
    lines = ", ".join(f"{line.quantity} x {line.item_id}" for line in order.lines)
    total = f"{order.total_cents // 100}.{order.total_cents % 100:02d} {order.currency}"
    say(f"Demo order through the mesh: order {order.order_id} for {order.customer_id}: {lines}")
    say(f"  total {total} (total_cents {order.total_cents})")
    if trace_id:
        say(f"  trace {trace_id}")
    if trace_id and receiver is not None:
        say(f"  {waterfall_command(receiver.store, '--trace', trace_id)}")
