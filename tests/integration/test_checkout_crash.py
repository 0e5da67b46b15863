"""Crash recovery of the checkout saga, tested by crashing: the orders instance that drives a
saga is killed with SIGKILL at a step boundary (its test-only switch,
services/orders/crashpoints.py), a new one is started, and the saga ends as if nothing had
happened, with exactly one effect per step, counted through the participants' own APIs and
the payments service's metrics. And every orders instance killed with 20 checkouts in flight:
after a restart each order ends within 30 s, the invariant intact."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc import aio

from foodmesh.delivery.v1 import delivery_pb2
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.payments.v1 import payments_pb2
from services.orders.crashpoints import CRASH_ENV
from services.orders.state import AUTHORIZE, CAPTURE, SCHEDULE
from tests.integration.conftest import MANY_COURIERS, ServiceProcess, Stack, order, stack_under
from tests.integration.platform import Clients, Samples, clients, handled, scrape

FAST_TAKEOVER = ("--lease-seconds", "1")
"""A killed instance's leases lapse after 1 s, and the new one looks for them every second."""
PAYMENT_METHODS = tuple(
    f"/foodmesh.payments.v1.PaymentService/{name}"
    for name in ("AuthorizePayment", "CapturePayment", "VoidPayment", "RefundPayment")
)
CONFIRMED, CANCELLED = orders_pb2.ORDER_STATUS_CONFIRMED, orders_pb2.ORDER_STATUS_CANCELLED


@pytest.fixture(scope="module")
def participants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """Consul, users, catalog, payments and delivery, and a customer; no orders yet."""
    with stack_under(tmp_path_factory.mktemp("crash")) as stack:
        stack.start_platform(orders=0, delivery=(*MANY_COURIERS, "--trip-seconds", "120"))
        yield stack, stack.customer()


def refusals(samples: Samples) -> dict[str, float]:
    """How often payments refused a mutation (a second capture, refund or void of a payment
    without the first call's idempotency key would be refused), per method."""
    return {
        method: sum(
            handled(samples, "server", "payments", method, code)
            for code in ("FailedPrecondition", "AlreadyExists", "InvalidArgument")
        )
        for method in PAYMENT_METHODS
    }


def killed(stack: Stack, process: ServiceProcess, point: str) -> None:
    """Wait for the process to have killed itself at `point`, and for Consul to see it."""
    code = process.proc.wait(timeout=20)
    process.stopped = True
    assert code == -signal.SIGKILL, f"orders exited with {code}:\n{process.log()[-3000:]}"
    assert f"{point} reached" in process.log()
    stack.wait_passing("orders", set())


def start_orders(stack: Stack, *, port: int | None = None, crash_at: str = "") -> ServiceProcess:
    env = {CRASH_ENV: crash_at} if crash_at else None
    process = stack.start("orders", *FAST_TAKEOVER, port=port, env=env)
    stack.wait_passing("orders", {process.port})
    return process


async def exactly_one_effect_per_step(
    c: Clients, order_id: str
) -> tuple[payments_pb2.Payment, delivery_pb2.Delivery]:
    await c.invariant_holds(order_id)
    payments, deliveries = await c.effects(order_id)
    assert len(payments) == 1, f"one authorization: {payments}"
    assert len(deliveries) == 1, f"one delivery scheduled: {deliveries}"
    return payments[0], deliveries[0]


@pytest.mark.parametrize(
    "point",
    [f"{when}:{step}" for step in (AUTHORIZE, SCHEDULE, CAPTURE) for when in ("before", "after")],
)
async def test_sigkill_at_a_step_boundary_leaves_one_effect_per_step(
    participants: tuple[Stack, str], point: str
) -> None:
    stack, customer = participants
    request = order(uuid.uuid4().hex, customer=customer)
    refused_before = refusals(scrape(stack, "payments"))
    crashing = start_orders(stack, crash_at=point)
    async with aio.insecure_channel(crashing.address) as channel:
        with pytest.raises(aio.AioRpcError) as died:
            await orders_pb2_grpc.OrderServiceStub(channel).PlaceOrder(request, timeout=20)
    assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    killed(stack, crashing, point)

    restarted = start_orders(stack, port=crashing.port)
    try:
        async with clients(stack) as c:
            # The customer's retry, with the same key: the order the first call created,
            # once the new instance has taken over its saga and finished it.
            placed = await c.orders.PlaceOrder(request, timeout=30)
            assert placed.status == CONFIRMED, placed
            payment, delivery = await exactly_one_effect_per_step(c, placed.order_id)
    finally:
        restarted.stop()
    assert payment.status == payments_pb2.PAYMENT_STATUS_CAPTURED
    assert delivery.status == delivery_pb2.DELIVERY_STATUS_ASSIGNED
    assert refusals(scrape(stack, "payments")) == refused_before


@pytest.mark.parametrize("point", [f"before-undo:{CAPTURE}", f"after-undo:{CAPTURE}"])
async def test_sigkill_while_compensating_a_cancel_refunds_once(
    participants: tuple[Stack, str], point: str
) -> None:
    stack, customer = participants
    crashing = start_orders(stack, crash_at=point)
    async with aio.insecure_channel(crashing.address) as channel:
        orders = orders_pb2_grpc.OrderServiceStub(channel)
        placed = await orders.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=20)
        assert placed.status == CONFIRMED, placed
        refused_before = refusals(scrape(stack, "payments"))
        cancel = orders_pb2.CancelOrderRequest(order_id=placed.order_id)
        with pytest.raises(aio.AioRpcError) as died:
            await orders.CancelOrder(cancel, timeout=20)
    assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    killed(stack, crashing, point)

    restarted = start_orders(stack, port=crashing.port)
    try:
        async with clients(stack) as c:
            cancelled = await c.orders.CancelOrder(cancel, timeout=30)
            assert cancelled.status == CANCELLED, cancelled
            payment, delivery = await exactly_one_effect_per_step(c, placed.order_id)
    finally:
        restarted.stop()
    assert payment.status == payments_pb2.PAYMENT_STATUS_REFUNDED
    assert delivery.status == delivery_pb2.DELIVERY_STATUS_CANCELLED
    assert refusals(scrape(stack, "payments")) == refused_before


def unfinished_sagas(stack: Stack) -> int:
    with sqlite3.connect(stack.data_dir / "orders.db") as db:
        return int(
            db.execute("SELECT COUNT(*) FROM order_views WHERE saga_ended = 0").fetchone()[0]
        )


async def test_every_instance_killed_with_20_checkouts_in_flight(stack: Stack) -> None:
    """Payments answers each call after 2 s, so every checkout is still running when the
    20th order is stored; then both orders instances are killed at once."""
    started = stack.start_platform(
        orders=2,
        orders_args=FAST_TAKEOVER,
        delivery=MANY_COURIERS,
        payments=("--fault-delay", "2", "--fault-delay-percent", "100"),
    )
    customer = stack.customer()
    requests = [order(f"in-flight-{n}", customer=customer) for n in range(20)]
    async with clients(stack) as shop:
        placing = [
            asyncio.ensure_future(shop.orders.PlaceOrder(request, timeout=60))
            for request in requests
        ]
        deadline = time.monotonic() + 30
        while unfinished_sagas(stack) < 20:
            assert time.monotonic() < deadline, "20 orders were never stored"
            await asyncio.sleep(0.05)
        for process in started["orders"]:
            process.stop(sig=signal.SIGKILL)
        assert unfinished_sagas(stack) == 20, "all 20 checkouts were in flight at the kill"
        for call in placing:  # they would wait out their deadline for an instance
            call.cancel()
        await asyncio.gather(*placing, return_exceptions=True)
    stack.wait_passing("orders", set())

    for process in started["orders"]:
        stack.start("orders", *FAST_TAKEOVER, port=process.port)
    stack.wait_passing("orders", {p.port for p in started["orders"]})
    restarted = time.monotonic()
    # The customers retry with the same keys, from an app started afresh (the first one's
    # breaker opened on the kill's failures, as it should).
    async with clients(stack) as c:
        settled = await asyncio.gather(
            *(c.orders.PlaceOrder(request, timeout=30) for request in requests)
        )
        took = time.monotonic() - restarted
        assert {o.status for o in settled} == {CONFIRMED}, [o.status for o in settled]
        assert took < 30, f"the 20 sagas took {took:.1f}s to end after the restart"
        assert len({o.order_id for o in settled}) == 20
        # (concurrently: every payments call takes 2 s here)
        await asyncio.gather(*(exactly_one_effect_per_step(c, o.order_id) for o in settled))
    assert unfinished_sagas(stack) == 0
    assert refusals(scrape(stack, "payments")) == dict.fromkeys(PAYMENT_METHODS, 0)
