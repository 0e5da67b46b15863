"""The platform on Postgres, a database and a role per service: the database refuses a role
another service's database; two instances of a service share their state through it; and
Postgres crashing (SIGKILL) and coming back under checkout load costs UNAVAILABLE answers
naming the database while it is down, and no checkout, payment or event lost or doubled."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator

import asyncpg
import grpc
import pytest

from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from scripts.postgres_server import PostgresServer
from tests.integration.conftest import STATEFUL, Stack, order, stack_under
from tests.integration.platform import (
    FINAL,
    CheckoutLoad,
    clients,
    final_order,
    in_history_exactly_once,
    notified_exactly_once,
    until,
)


async def test_each_service_owns_its_database(postgres_server: PostgresServer) -> None:
    for service in STATEFUL:
        connection = await asyncpg.connect(postgres_server.service_database(service), timeout=10)
        try:
            await connection.execute("CREATE TABLE IF NOT EXISTS things (id text PRIMARY KEY)")
            await connection.execute(
                "INSERT INTO things VALUES ($1) ON CONFLICT DO NOTHING", service
            )
            assert await connection.fetchval("SELECT id FROM things") == service
            assert await connection.fetchval("SELECT current_database()") == service.replace(
                "-", "_"
            )
        finally:
            await connection.close()


async def test_a_role_cannot_reach_another_services_database(
    postgres_server: PostgresServer,
) -> None:
    postgres_server.service_database("orders")
    postgres_server.service_database("payments")
    orders_password = postgres_server.passwords["orders"]
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
        await asyncpg.connect(
            postgres_server.url("orders", orders_password, "payments"), timeout=10
        )
    assert "permission denied for database" in str(refused.value)
    assert "payments" in str(refused.value)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            postgres_server.url("orders", "not-the-password", "orders"), timeout=10
        )


@pytest.fixture(scope="module")
def on_postgres(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Consul, NATS, and the platform with two orders instances, notifications and
    order-history, every service's state in a Postgres database of its own."""
    with stack_under(tmp_path_factory.mktemp("on-postgres"), postgres=postgres_server) as stack:
        stack.start_nats()
        stack.start("notifications")
        stack.start("order-history")
        stack.start_platform(orders=2)
        stack.wait_passing("notifications", 1)
        stack.wait_passing("order-history", 1)
        yield stack


async def test_instances_share_state_through_postgres_and_events_flow(
    on_postgres: Stack,
) -> None:
    stack = on_postgres
    customer = stack.customer("sharing@example.com")
    async with clients(stack) as c:
        placed = [
            await c.orders.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=30)
            for _ in range(6)
        ]
        assert {p.status for p in placed} == {orders_pb2.ORDER_STATUS_CONFIRMED}
        for p in placed:
            await c.invariant_holds(p.order_id)
    # Each instance answers for every order, whichever placed it: one database.
    for instance in [p for p in stack.processes if p.name == "orders"]:
        with grpc.insecure_channel(instance.address) as channel:
            stub = orders_pb2_grpc.OrderServiceStub(channel)
            for p in placed:
                got = stub.GetOrder(orders_pb2.GetOrderRequest(order_id=p.order_id), timeout=10)
                assert got.status == orders_pb2.ORDER_STATUS_CONFIRMED
    assert not list(stack.data_dir.glob("*.db")), "no service kept a SQLite file"
    await notified_exactly_once(stack, customer, placed)
    await in_history_exactly_once(stack, customer, placed)


async def test_postgres_killed_under_load_costs_unavailable_and_loses_nothing(
    on_postgres: Stack, postgres_server: PostgresServer
) -> None:
    stack = on_postgres
    customer = stack.customer("crash@example.com")
    load = CheckoutLoad(customer)
    async with clients(stack) as c:
        callers = [asyncio.create_task(load.caller(c.orders)) for _ in range(4)]
        try:
            await until(lambda: len(load.answers) >= 8, "checkouts before the crash")
            down = time.monotonic()
            postgres_server.halt(signal.SIGKILL)
            await asyncio.sleep(3)  # down for a while, the callers calling on
            postgres_server.resume()
            up = time.monotonic()
            answered = len(load.answers)
            await until(lambda: len(load.answers) >= answered + 8, "checkouts after the restart")
        finally:
            load.stopping.set()
            await asyncio.gather(*callers)
        # Every key answered once; the same key again is the same order (nothing doubled).
        assert set(load.answers) == set(load.keys)
        for key, answer in load.answers.items():
            again = await c.orders.PlaceOrder(order(key, customer=customer), timeout=30)
            assert again.order_id == answer.order_id
        finals = [await final_order(c.orders, a.order_id) for a in load.answers.values()]
        for final in finals:
            await c.invariant_holds(final.order_id)
    # What the callers saw: UNAVAILABLE, from the services naming their database, then from
    # the callers' own mesh channels (outlier ejection, the circuit breaker) naming the
    # service, until the instances answered again.
    assert load.failures, "the crash was seen by the callers"
    for at, code, details in load.failures:
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "database" in details or "'orders'" in details, details
        assert down - 1 <= at, (at - down, details)
    assert "database" in load.failures[0][2], load.failures[0]
    settle = max(at for at, _, _ in load.failures) - up
    assert settle < 40, f"calls failed for {settle:.1f}s after Postgres was back"
    print(f"Postgres down 3 s: {len(load.failures)} failed attempts, the last {settle:.1f} s after")
    await notified_exactly_once(stack, customer, [f for f in finals if f.status in FINAL])
