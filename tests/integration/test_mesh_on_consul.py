"""The walking skeleton end to end: real Consul, real catalog and orders processes (with the
users, payments and delivery services a checkout needs), calls across services on mesh
channels, graceful shutdown, Consul restarts and outages."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc import aio

import mesh
from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from scripts.processes import wait_until_async
from tests.integration.conftest import MANY_COURIERS, ServiceProcess, Stack, count_orders, order

PLATFORM = ("users", "catalog", "payments", "delivery", "orders")


async def test_instances_register_with_grpc_checks_and_meta(stack: Stack) -> None:
    catalogs = [stack.start("catalog"), stack.start("catalog")]
    orders = stack.start("orders")  # registers without its dependencies: none is called
    stack.wait_passing("catalog", {c.port for c in catalogs})
    stack.wait_passing("orders", {orders.port})

    entries = stack.passing("catalog")
    ids = {e["Service"]["ID"] for e in entries}
    assert len(ids) == 2, "each instance has its own id"
    for entry in entries:
        service = entry["Service"]
        assert service["Service"] == "catalog"
        assert service["Address"] == "127.0.0.1"
        assert service["Meta"]["grpc_services"] == "foodmesh.catalog.v1.CatalogService"
        assert service["Meta"]["version"]
        assert "grpc" in service["Tags"]
        checks = [c for c in entry["Checks"] if c["ServiceID"] == service["ID"]]
        assert len(checks) == 1 and checks[0]["Type"] == "grpc"
        assert checks[0]["Status"] == "passing"
    assert f"registered {orders_id(stack)}" in orders.log()


def orders_id(stack: Stack) -> str:
    return str(stack.passing("orders")[0]["Service"]["ID"])


def platform_passing(stack: Stack) -> None:
    """Wait until every running instance of the platform's services passes."""
    for name in PLATFORM:
        stack.wait_passing(
            name, {p.port for p in stack.processes if p.name == name and not p.stopped}
        )


def started(stack: Stack, *names: str) -> dict[str, ServiceProcess]:
    """One instance of each of `names`, all passing."""
    processes = {name: stack.start(name) for name in names}
    for name, process in processes.items():
        stack.wait_passing(name, {process.port})
    return processes


async def test_port_zero_registers_the_bound_port(stack: Stack) -> None:
    stack.start("catalog", port=0)
    stack.wait_passing("catalog", 1)
    (port,) = stack.passing_ports("catalog")
    assert port > 0
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        item = await catalog_pb2_grpc.CatalogServiceStub(channel).GetItem(
            catalog_pb2.GetItemRequest(item_id="roma-margherita"), timeout=5
        )
    assert item.price_cents == 850


async def test_order_placed_across_services_through_mesh_channels(stack: Stack) -> None:
    stack.start_platform(catalog=2)
    customer = stack.customer()
    async with mesh.channel("orders", consul=stack.settings) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        placed = await stub.PlaceOrder(order("k-1", customer=customer, quantity=3), timeout=10)
        fetched = await stub.GetOrder(orders_pb2.GetOrderRequest(order_id=placed.order_id))
    assert placed.total_cents == 3 * 850 and placed.currency == "EUR"
    assert placed.lines[0].unit_price_cents == 850
    assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
    assert placed.customer_id == customer and placed.payment_id and placed.delivery_id
    assert fetched == placed
    async with mesh.channel("catalog", consul=stack.settings) as channel:
        page = await catalog_pb2_grpc.CatalogServiceStub(channel).ListItems(
            catalog_pb2.ListItemsRequest(restaurant_id="trattoria-roma")
        )
    assert {i.item_id for i in page.items} >= {"roma-margherita", "roma-carbonara"}


async def test_bad_input_gets_clear_status_and_stores_nothing(stack: Stack) -> None:
    # No order is stored, so no checkout starts: payments and delivery are not needed.
    started(stack, "users", "catalog", "orders")
    customer = stack.customer()
    no_payment_method = order("", customer=customer)
    no_payment_method.ClearField("payment_method")
    no_address = order("", customer=customer)
    no_address.delivery_address = "  "
    cases = [
        (order("", customer=""), grpc.StatusCode.INVALID_ARGUMENT, "customer_id"),
        (
            orders_pb2.PlaceOrderRequest(customer_id="bob"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lines",
        ),
        (no_payment_method, grpc.StatusCode.INVALID_ARGUMENT, "payment_method"),
        (no_address, grpc.StatusCode.INVALID_ARGUMENT, "delivery_address"),
        (
            order("", customer=customer, quantity=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lines[0].quantity",
        ),
        (order("", customer="nobody"), grpc.StatusCode.NOT_FOUND, "customer_id 'nobody'"),
        (
            order("", customer=customer, item="no-such-dish"),
            grpc.StatusCode.NOT_FOUND,
            "no-such-dish",
        ),
        (
            order("", customer=customer, item="roma-truffle-risotto"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "roma-truffle-risotto",
        ),
    ]
    async with mesh.channel("orders", consul=stack.settings) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        for request, code, named in cases:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.PlaceOrder(request, timeout=10)
            assert err.value.code() == code, err.value.details()
            assert named in (err.value.details() or "")
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetOrder(orders_pb2.GetOrderRequest(order_id="missing-order"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "missing-order" in (err.value.details() or "")
    assert count_orders(stack) == 0


async def test_idempotency_key_across_two_orders_instances(stack: Stack) -> None:
    stack.start_platform(orders=2)
    request = order("same-key", customer=stack.customer())
    async with mesh.channel("orders", consul=stack.settings) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        placed = await asyncio.gather(*[stub.PlaceOrder(request, timeout=10) for _ in range(12)])
    assert len({o.order_id for o in placed}) == 1
    assert {o.status for o in placed} == {orders_pb2.ORDER_STATUS_CONFIRMED}
    assert count_orders(stack) == 1


async def test_sigterm_deregisters_and_no_call_fails(stack: Stack) -> None:
    platform = stack.start_platform(catalog=2, delivery=MANY_COURIERS)
    catalogs, (orders,) = platform["catalog"], platform["orders"]
    customer = stack.customer()
    failures: list[aio.AioRpcError] = []
    placed: list[int] = []
    succeeded = 0
    stop = asyncio.Event()

    async with (
        mesh.channel("orders", consul=stack.settings) as orders_channel,
        mesh.channel("catalog", consul=stack.settings) as catalog_channel,
    ):
        orders_stub = orders_pb2_grpc.OrderServiceStub(orders_channel)
        catalog_stub = catalog_pb2_grpc.CatalogServiceStub(catalog_channel)

        async def steady(worker: int) -> None:
            nonlocal succeeded
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if worker % 2:
                        await orders_stub.PlaceOrder(
                            order(f"w{worker}-{n}", customer=customer), timeout=10
                        )
                        placed.append(n)
                    else:
                        await catalog_stub.GetItem(
                            catalog_pb2.GetItemRequest(item_id="roma-carbonara"), timeout=10
                        )
                    succeeded += 1
                except aio.AioRpcError as exc:
                    failures.append(exc)

        workers = [asyncio.create_task(steady(i)) for i in range(4)]
        # orders must be pricing through both catalogs before one of them goes
        await wait_until_async(
            lambda: (
                succeeded >= 40 and len(placed) >= 20 and "catalog: 2 endpoint(s)" in orders.log()
            ),
            timeout=30,
            message="no traffic through orders to both catalogs",
        )
        victim = catalogs[0]
        code = await asyncio.to_thread(victim.stop, signal.SIGTERM)
        await wait_until_async(
            lambda: stack.passing_ports("catalog") == {catalogs[1].port},
            timeout=10,
            message="victim still in Consul",
        )
        after = succeeded
        await wait_until_async(
            lambda: succeeded >= after + 40,
            timeout=30,
            message="traffic stopped after the instance left",
        )
        stop.set()
        await asyncio.gather(*workers)

    assert code == 0, victim.log()[-2000:]
    assert failures == []
    log = victim.log()
    assert "deregistered" in log and log.index("deregistered") < log.rindex("stopped")
    assert f"removed {victim.address}" in orders.log(), "orders' channel dropped the instance"


async def test_consul_restart_leads_to_reregistration(stack: Stack) -> None:
    platform = stack.start_platform()
    (catalog,) = platform["catalog"]
    customer = stack.customer()

    def ids() -> dict[str, str]:
        return {name: str(stack.passing(name)[0]["Service"]["ID"]) for name in PLATFORM}

    before = ids()
    stack.agent.restart()
    platform_passing(stack)  # a dev agent forgot; they come back
    assert ids() == before
    assert "forgot" in catalog.log()
    async with mesh.channel("orders", consul=stack.settings) as channel:
        placed = await orders_pb2_grpc.OrderServiceStub(channel).PlaceOrder(
            order("after-restart", customer=customer), timeout=10
        )
    assert placed.total_cents == 1700
    assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed


async def test_consul_outage_keeps_calls_working(stack: Stack) -> None:
    stack.start_platform(catalog=2, delivery=MANY_COURIERS)  # 12 orders: more than 10 trips
    customer = stack.customer()
    async with mesh.channel("orders", consul=stack.settings) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        # every hop has resolved: orders to users and catalog, its checkout to payments and
        # delivery
        before = await stub.PlaceOrder(order("before", customer=customer), timeout=10)
        assert before.status == orders_pb2.ORDER_STATUS_CONFIRMED, before

        stack.agent.kill()
        during = [
            await stub.PlaceOrder(order(f"during-{i}", customer=customer), timeout=10)
            for i in range(10)
        ]
        assert len({o.order_id for o in during}) == 10
        assert {o.status for o in during} == {orders_pb2.ORDER_STATUS_CONFIRMED}

        stack.agent.start()  # an empty agent: instances re-register, watches resume
        platform_passing(stack)
        after = await stub.PlaceOrder(order("after", customer=customer), timeout=10)
    assert after.total_cents == 1700
    assert after.status == orders_pb2.ORDER_STATUS_CONFIRMED, after
