"""The checkout saga with real parts: a real Consul, real users, catalog, payments, delivery
and orders processes, and calls through mesh channels as a user's app makes them. After every
test the saga's invariant is checked through the participants' own APIs:

- a CONFIRMED (or later) order has exactly one CAPTURED payment and one delivery that is not
  CANCELLED;
- a REJECTED or CANCELLED order has no payment left AUTHORIZED or CAPTURED and no delivery
  left active.

One platform is shared by the tests that do not disturb it (module scope); the tests that stop
a participant or need other flags start their own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc import aio

from foodmesh.delivery.v1 import delivery_pb2
from foodmesh.orders.v1 import orders_pb2
from foodmesh.payments.v1 import payments_pb2
from scripts.processes import wait_until_async
from tests.integration.conftest import Stack, count_orders, engine_of, order, stack_under
from tests.integration.platform import Clients, clients, handled, scrape

PLACE = "/foodmesh.orders.v1.OrderService/PlaceOrder"
TRIP_SECONDS = "3"  # pickup at half the trip: time enough to cancel a confirmed order


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """Consul, and users, catalog, payments, delivery and two orders instances, on each
    engine; a customer."""
    root = tmp_path_factory.mktemp("checkout")
    with stack_under(root, postgres=engine_of(request)) as stack:
        stack.start_nats()  # delivery's events move orders out for delivery and to DELIVERED
        stack.start_platform(orders=2, delivery=("--trip-seconds", TRIP_SECONDS))
        yield stack, stack.customer()


def key() -> str:
    return uuid.uuid4().hex


async def watch_until(c: Clients, order_id: str, status: int, timeout: float = 20.0) -> list[int]:
    """The statuses WatchOrder sends until `status` (its stream ends after a final one)."""
    seen: list[int] = []

    async def follow() -> None:
        async for update in c.orders.WatchOrder(orders_pb2.WatchOrderRequest(order_id=order_id)):
            if not seen or seen[-1] != update.status:
                seen.append(update.status)
            if update.status == status:
                return

    await asyncio.wait_for(follow(), timeout)
    return seen


async def test_checkout_confirms_and_the_order_is_delivered(platform: tuple[Stack, str]) -> None:
    stack, customer = platform
    async with clients(stack) as c:
        placed = await c.orders.PlaceOrder(order(key(), customer=customer), timeout=20)
        assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
        assert placed.payment_id and placed.delivery_id and not placed.rejection_reason
        await c.invariant_holds(placed.order_id)
        seen = await watch_until(c, placed.order_id, orders_pb2.ORDER_STATUS_DELIVERED)
        assert seen == [
            orders_pb2.ORDER_STATUS_CONFIRMED,
            orders_pb2.ORDER_STATUS_OUT_FOR_DELIVERY,
            orders_pb2.ORDER_STATUS_DELIVERED,
        ]
        await c.invariant_holds(placed.order_id)


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
async def test_a_declined_payment_rejects_the_order_with_nothing_to_undo(
    platform: tuple[Stack, str], card: str, reason: str
) -> None:
    stack, customer = platform
    async with clients(stack) as c:
        placed = await c.orders.PlaceOrder(
            order(key(), customer=customer, payment_method=card), timeout=20
        )
        assert placed.status == orders_pb2.ORDER_STATUS_REJECTED
        assert reason in placed.rejection_reason
        found = await c.invariant_holds(placed.order_id)
        deliveries = await c.delivery.ListDeliveries(
            delivery_pb2.ListDeliveriesRequest(order_id=found.order_id)
        )
        assert not deliveries.deliveries, "no delivery is scheduled for a declined payment"


async def test_cancel_before_pickup_refunds_and_cancels_the_delivery(
    platform: tuple[Stack, str],
) -> None:
    stack, customer = platform
    async with clients(stack) as c:
        placed = await c.orders.PlaceOrder(order(key(), customer=customer), timeout=20)
        assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED
        cancelled = await c.orders.CancelOrder(
            orders_pb2.CancelOrderRequest(order_id=placed.order_id), timeout=20
        )
        assert cancelled.status == orders_pb2.ORDER_STATUS_CANCELLED
        await c.invariant_holds(placed.order_id)
        payment = await c.payments.GetPayment(
            payments_pb2.GetPaymentRequest(payment_id=placed.payment_id)
        )
        assert payment.status == payments_pb2.PAYMENT_STATUS_REFUNDED
        again = await c.orders.CancelOrder(
            orders_pb2.CancelOrderRequest(order_id=placed.order_id), timeout=20
        )
        assert again.status == orders_pb2.ORDER_STATUS_CANCELLED


async def test_cancel_after_pickup_is_refused_and_changes_nothing(
    platform: tuple[Stack, str],
) -> None:
    stack, customer = platform
    async with clients(stack) as c:
        placed = await c.orders.PlaceOrder(order(key(), customer=customer), timeout=20)
        await watch_until(c, placed.order_id, orders_pb2.ORDER_STATUS_OUT_FOR_DELIVERY)
        with pytest.raises(aio.AioRpcError) as refused:
            await c.orders.CancelOrder(
                orders_pb2.CancelOrderRequest(order_id=placed.order_id), timeout=20
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "picked up" in (refused.value.details() or "")
        found = await c.invariant_holds(placed.order_id)
        assert found.status in (
            orders_pb2.ORDER_STATUS_OUT_FOR_DELIVERY,
            orders_pb2.ORDER_STATUS_DELIVERED,
        )


async def test_an_unknown_customer_creates_no_order(platform: tuple[Stack, str]) -> None:
    stack, _ = platform
    before = count_orders(stack)
    async with clients(stack) as c:
        with pytest.raises(aio.AioRpcError) as refused:
            await c.orders.PlaceOrder(order(key(), customer="nobody"), timeout=20)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "customer_id" in (refused.value.details() or "")
    assert count_orders(stack) == before


@pytest.mark.parametrize("field", ["payment_method", "delivery_address"])
async def test_a_checkout_without_how_to_pay_or_where_to_go_is_refused(
    platform: tuple[Stack, str], field: str
) -> None:
    stack, customer = platform
    request = order(key(), customer=customer)
    request.ClearField(field)  # type: ignore[arg-type]
    before = count_orders(stack)
    async with clients(stack) as c:
        with pytest.raises(aio.AioRpcError) as refused:
            await c.orders.PlaceOrder(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "")
    assert count_orders(stack) == before


async def test_concurrent_duplicates_make_one_order_and_one_saga(
    platform: tuple[Stack, str],
) -> None:
    stack, customer = platform
    request = order(key(), customer=customer)
    async with clients(stack) as c:
        placed = await asyncio.gather(
            *(c.orders.PlaceOrder(request, timeout=20) for _ in range(10))
        )
        assert len({o.order_id for o in placed}) == 1
        order_id = placed[0].order_id
        assert {o.status for o in placed} == {orders_pb2.ORDER_STATUS_CONFIRMED}
        await c.invariant_holds(order_id)
        payments = await c.payments.ListPayments(
            payments_pb2.ListPaymentsRequest(order_id=order_id)
        )
        assert len(payments.payments) == 1, "one saga: one authorization"


SAGA_CALLS = (
    ("payments", "/foodmesh.payments.v1.PaymentService/AuthorizePayment"),
    ("delivery", "/foodmesh.delivery.v1.DeliveryService/ScheduleDelivery"),
    ("payments", "/foodmesh.payments.v1.PaymentService/CapturePayment"),
)


async def test_each_saga_is_driven_by_the_one_instance_that_placed_it(
    platform: tuple[Stack, str],
) -> None:
    """Counted in each orders instance's own metrics: the participant calls an instance
    makes are exactly one checkout's worth per order it placed, none for the other's."""
    stack, customer = platform
    ports = sorted(stack.passing_ports("orders"))
    assert len(ports) == 2

    def counts() -> dict[int, list[float]]:
        counted = {}
        for port in ports:
            samples = scrape(stack, "orders", port)
            placed = handled(samples, "server", "orders", PLACE)
            calls = [handled(samples, "client", s, m) for s, m in SAGA_CALLS]
            counted[port] = [placed, *calls]
        return counted

    before = counts()
    async with clients(stack) as c:
        placed = await asyncio.gather(
            *(c.orders.PlaceOrder(order(key(), customer=customer), timeout=20) for _ in range(8))
        )
        for one in placed:
            assert one.status == orders_pb2.ORDER_STATUS_CONFIRMED
            await c.invariant_holds(one.order_id)
    after = counts()
    made = {port: [a - b for a, b in zip(after[port], before[port], strict=True)] for port in ports}
    for port, (orders_placed, *calls) in made.items():
        assert orders_placed > 0, f"the mesh channel balanced every order away from {port}"
        assert calls == [orders_placed] * len(SAGA_CALLS), (port, made)
    assert sum(m[0] for m in made.values()) == 8


async def test_no_courier_voids_the_authorization_and_rejects(stack: Stack) -> None:
    stack.start_platform(delivery=("--couriers", "0"))
    customer = stack.customer()
    async with clients(stack) as c:
        placed = await c.orders.PlaceOrder(order(key(), customer=customer), timeout=20)
        assert placed.status == orders_pb2.ORDER_STATUS_REJECTED
        assert "no courier available" in placed.rejection_reason
        await c.invariant_holds(placed.order_id)
        payment = await c.payments.GetPayment(
            payments_pb2.GetPaymentRequest(payment_id=placed.payment_id)
        )
        assert payment.status == payments_pb2.PAYMENT_STATUS_VOIDED


async def test_payments_down_the_step_retries_until_payments_is_back(stack: Stack) -> None:
    """Within the saga's deadline the authorization is retried (Temporal's 1 s, 2 s, ...):
    payments back in time -> CONFIRMED. Still down at the deadline -> the saga compensates
    once payments answers again (a timed-out authorization may have happened) -> REJECTED."""
    started = stack.start_platform(orders_args=("--saga-timeout", "12"))
    customer = stack.customer()
    payments = started["payments"][0]
    async with clients(stack) as c:
        payments.stop()
        stack.wait_passing("payments", set())
        pending = await c.orders.PlaceOrder(order(key(), customer=customer), timeout=2)
        assert pending.status == orders_pb2.ORDER_STATUS_PENDING
        back = stack.start("payments", port=payments.port)
        stack.wait_passing("payments", {back.port})
        seen = await watch_until(c, pending.order_id, orders_pb2.ORDER_STATUS_CONFIRMED)
        assert seen[-1] == orders_pb2.ORDER_STATUS_CONFIRMED
        await c.invariant_holds(pending.order_id)

        back.stop()
        stack.wait_passing("payments", set())
        late = await c.orders.PlaceOrder(order(key(), customer=customer), timeout=2)
        assert late.status == orders_pb2.ORDER_STATUS_PENDING
        await wait_until_async(
            lambda: deadline_passed(late, 12),
            timeout=30,
            message="the saga's deadline never passed",
        )
        again = stack.start("payments", port=payments.port)
        stack.wait_passing("payments", {again.port})
        seen = await watch_until(c, late.order_id, orders_pb2.ORDER_STATUS_REJECTED, 30)
        found = await c.invariant_holds(late.order_id)
        assert "deadline" in found.rejection_reason, found.rejection_reason


def deadline_passed(placed: orders_pb2.Order, saga_timeout: float) -> bool:
    return time.time() > placed.create_time.ToDatetime().timestamp() + saga_timeout + 0.5
