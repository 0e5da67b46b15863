"""Prometheus metrics from real processes: the endpoint is found through Consul's service
meta, and after a known sequence of calls it reports the matching counts."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

import mesh
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.policy import BreakerPolicy, ServicePolicy
from tests.integration.conftest import FAILING, Stack, order
from tests.integration.platform import handled, rpc_labels, scrape, value

PLACE_ORDER = "/foodmesh.orders.v1.OrderService/PlaceOrder"
GET_ITEM = "/foodmesh.catalog.v1.CatalogService/GetItem"
AUTHORIZE = "/foodmesh.payments.v1.PaymentService/AuthorizePayment"
CAPTURE = "/foodmesh.payments.v1.PaymentService/CapturePayment"
CHECKOUT_CALLS = (
    ("users", "/foodmesh.users.v1.UserService/GetUser"),
    ("payments", AUTHORIZE),
    ("delivery", "/foodmesh.delivery.v1.DeliveryService/ScheduleDelivery"),
    ("payments", CAPTURE),
)


async def test_counts_match_a_known_sequence_of_calls(stack: Stack) -> None:
    stack.start_platform()
    customer = stack.customer()
    async with mesh.channel("orders", consul=stack.settings) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        for n in range(3):
            placed = await stub.PlaceOrder(order(f"metrics-{n}", customer=customer), timeout=10)
            assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
        with pytest.raises(aio.AioRpcError):
            await stub.PlaceOrder(orders_pb2.PlaceOrderRequest(customer_id=""), timeout=10)

    orders = scrape(stack, "orders")
    assert handled(orders, "server", "orders", PLACE_ORDER) == 3
    assert handled(orders, "server", "orders", PLACE_ORDER, "InvalidArgument") == 1
    place = rpc_labels("orders", PLACE_ORDER)
    assert value(orders, "grpc_server_started_total", **place) == 4
    assert value(orders, "grpc_server_msg_received_total", **place) == 4
    assert value(orders, "grpc_server_msg_sent_total", **place) == 3
    assert value(orders, "grpc_server_handling_seconds_count", **place) == 4
    assert handled(orders, "client", "catalog", GET_ITEM) == 3
    get_item = rpc_labels("catalog", GET_ITEM)
    assert value(orders, "grpc_client_started_total", **get_item) == 3
    assert value(orders, "grpc_client_handling_seconds_count", **get_item) == 3
    assert (
        value(
            orders,
            "mesh_client_attempts_total",
            service="catalog",
            grpc_service=get_item["grpc_service"],
            grpc_method=get_item["grpc_method"],
            kind="first",
        )
        == 3
    )
    assert value(orders, "mesh_healthy_endpoints", service="catalog") == 1
    assert value(orders, "mesh_circuit_breaker_state", service="catalog", state="closed") == 1
    # the customer check and the checkout saga's calls, one of each per order
    for service, method in CHECKOUT_CALLS:
        assert handled(orders, "client", service, method) == 3, (service, method)
    # each checkout's records are write transactions of orders' database, five at least
    # (placed, authorized, scheduled, captured, confirmed), each also counted by the store
    assert value(orders, "foodmesh_db_commits_total", service="orders") >= 3 * 5
    payments = scrape(stack, "payments")
    for method in (AUTHORIZE, CAPTURE):
        assert handled(payments, "server", "payments", method) == 3, method
    catalog = scrape(stack, "catalog")
    assert handled(catalog, "server", "catalog", GET_ITEM) == 3
    assert not [k for k in catalog if "grpc.health" in str(k)], "health checks not counted"


async def test_breaker_state_metric_says_open(stack: Stack) -> None:
    # No order is stored while catalog fails, so no checkout starts: no payments, no delivery.
    started = [stack.start("users"), stack.start("catalog", *FAILING), stack.start("orders")]
    for process in started:
        stack.wait_passing(process.name, {process.port})
    customer = stack.customer()
    patient = ServicePolicy(breaker=BreakerPolicy(minimum_calls=1_000_000))
    async with mesh.channel("orders", consul=stack.settings, policy=patient) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        for n in range(60):
            with pytest.raises(aio.AioRpcError) as err:
                await stub.PlaceOrder(order(f"open-{n}", customer=customer), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            if "circuit for service 'catalog' is open" in (err.value.details() or ""):
                break
    orders = scrape(stack, "orders")
    assert value(orders, "mesh_circuit_breaker_state", service="catalog", state="open") == 1
    assert value(orders, "mesh_circuit_breaker_state", service="catalog", state="closed") == 0
    assert (
        value(
            orders,
            "mesh_circuit_breaker_transitions_total",
            service="catalog",
            from_state="closed",
            to_state="open",
        )
        == 1
    )
    assert (
        value(
            orders,
            "mesh_client_attempts_total",
            service="catalog",
            grpc_service="foodmesh.catalog.v1.CatalogService",
            grpc_method="GetItem",
            kind="retry",
        )
        > 0
    )
