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
from tests.integration.platform import scrape, value

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
    assert (
        value(orders, "mesh_server_calls_total", service="orders", method=PLACE_ORDER, code="OK")
        == 3
    )
    assert (
        value(
            orders,
            "mesh_server_calls_total",
            service="orders",
            method=PLACE_ORDER,
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    assert (
        value(orders, "mesh_client_calls_total", service="catalog", method=GET_ITEM, code="OK") == 3
    )
    assert (
        value(
            orders, "mesh_client_attempts_total", service="catalog", method=GET_ITEM, kind="first"
        )
        == 3
    )
    assert (
        value(orders, "mesh_client_call_duration_seconds_count", service="catalog", method=GET_ITEM)
        == 3
    )
    assert value(orders, "mesh_healthy_endpoints", service="catalog") == 1
    assert value(orders, "mesh_circuit_breaker_state", service="catalog", state="closed") == 1
    # the customer check and the checkout saga's calls, one of each per order
    for service, method in CHECKOUT_CALLS:
        assert (
            value(orders, "mesh_client_calls_total", service=service, method=method, code="OK") == 3
        ), (service, method)
    # each checkout's records are write transactions of orders' database, five at least
    # (placed, authorized, scheduled, captured, confirmed), each also counted by the store
    assert value(orders, "foodmesh_db_commits_total", service="orders") >= 3 * 5
    payments = scrape(stack, "payments")
    for method in (AUTHORIZE, CAPTURE):
        assert (
            value(payments, "mesh_server_calls_total", service="payments", method=method, code="OK")
            == 3
        ), method
    catalog = scrape(stack, "catalog")
    assert (
        value(catalog, "mesh_server_calls_total", service="catalog", method=GET_ITEM, code="OK")
        == 3
    )
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
            orders, "mesh_client_attempts_total", service="catalog", method=GET_ITEM, kind="retry"
        )
        > 0
    )
