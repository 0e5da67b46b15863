"""A spike in one context does not slow another: a flood of 1000 notifications, each pushed at
a cost (`--push-delay`), leaves PlaceOrder's p50 within 10% of its p50 without the flood.

The flood is 1000 orders' OrderPlaced and OrderConfirmed put on the ORDERS stream at once
(as a backlog would come after an outage), CloudEvents like the ones orders' relay publishes;
the notifications service works through them for seconds while checkouts are measured, one
after another. The checkouts' p50 is compared with theirs before the flood and after it has
drained, in the same run; then the flood's notifications are counted, each exactly once.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import nats
import pytest

import mesh
from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from foodmesh.orders.v1 import events_pb2, orders_pb2, orders_pb2_grpc
from meshkit.events import CloudEvent, subject_for
from meshkit.events.relay import event_id
from tests.integration.conftest import LONG_TRIPS, Stack, order, stack_under
from tests.integration.platform import consumer_drained

FLOOD = 1000
PUSH_DELAY_S = 0.01
"""1000 pushes at 10 ms: a flood of ten seconds."""
CHECKOUTS = 40
"""PlaceOrder calls per measurement, one after another."""


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_under(tmp_path_factory.mktemp("flood")) as stack:
        stack.start_nats()
        stack.start("notifications", "--push-delay", str(PUSH_DELAY_S))
        stack.start_platform(orders=1, delivery=LONG_TRIPS)
        stack.wait_passing("notifications", 1)
        yield stack


def _event(
    order_id: str, version: int, message: events_pb2.OrderPlaced | events_pb2.OrderConfirmed
) -> CloudEvent:
    return CloudEvent(
        id=event_id(order_id, version),
        source="/foodmesh/orders",
        type=message.DESCRIPTOR.full_name,
        subject=order_id,
        time=datetime.now(UTC),
        data=message.SerializeToString(),
    )


async def _flood(url: str, customer: str) -> None:
    """FLOOD confirmed orders of `customer` on the ORDERS stream, with PubAcks."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        for start in range(0, FLOOD, 100):
            publishes = []
            for n in range(start, start + 100):
                order_id = f"flood-{customer}-{n}"
                for version, message in (
                    (1, events_pb2.OrderPlaced(order_id=order_id, customer_id=customer)),
                    (2, events_pb2.OrderConfirmed(order_id=order_id)),
                ):
                    event = _event(order_id, version, message)
                    subject = subject_for("orders", event.type)
                    publishes.append(js.publish(subject, event.data, headers=event.headers()))
            await asyncio.gather(*publishes)
    finally:
        await client.close()


async def _checkouts(stub: orders_pb2_grpc.OrderServiceAsyncStub, customer: str) -> list[float]:
    """CHECKOUTS PlaceOrder calls, one after another; their latencies in seconds."""
    loop = asyncio.get_running_loop()
    latencies = []
    for _ in range(CHECKOUTS):
        started = loop.time()
        placed = await stub.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=30)
        latencies.append(loop.time() - started)
        assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
    return latencies


async def _pending(stack: Stack) -> int:
    assert stack.nats is not None
    client = await nats.connect(stack.nats.url)
    try:
        info = await client.jetstream().consumer_info("ORDERS", "notifications")
        return info.num_pending + info.num_ack_pending
    finally:
        await client.close()


async def test_a_flood_of_notifications_leaves_checkout_p50_within_ten_percent(
    flooded: Stack,
) -> None:
    stack = flooded
    assert stack.nats is not None
    customer = stack.customer()
    flood_customer = f"flood-{uuid.uuid4().hex[:8]}"
    async with mesh.channel("orders", consul=stack.settings) as channel:
        orders = orders_pb2_grpc.OrderServiceStub(channel)
        await _checkouts(orders, customer)  # warm-up: connections, caches, the lease
        before = await _checkouts(orders, customer)
        await _flood(stack.nats.url, flood_customer)
        during = await _checkouts(orders, customer)
        left = await _pending(stack)
        assert left > FLOOD // 4, f"the flood was over before the checkouts were ({left} left)"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + FLOOD * PUSH_DELAY_S * 4 + 30
        while not await consumer_drained(stack):
            assert loop.time() < give_up, "the flood never drained"
            await asyncio.sleep(0.2)
        after = await _checkouts(orders, customer)
    baseline = statistics.median(before + after)
    flood = statistics.median(during)
    print(  # shown with pytest -s: the figures behind the verdict
        f"PlaceOrder p50: {flood * 1000:.1f} ms during the flood ({left} events left after),"
        f" {baseline * 1000:.1f} ms without; ratio {flood / baseline:.3f}"
    )
    assert flood <= 1.10 * baseline, (
        f"PlaceOrder p50 {flood * 1000:.1f} ms during the flood,"
        f" {baseline * 1000:.1f} ms without (before {statistics.median(before) * 1000:.1f},"
        f" after {statistics.median(after) * 1000:.1f})"
    )
    async with mesh.channel("notifications", consul=stack.settings) as channel:
        notifications = notifications_pb2_grpc.NotificationServiceStub(channel)
        page = await notifications.ListNotifications(
            notifications_pb2.ListNotificationsRequest(user_id=flood_customer, page_size=1000)
        )
    assert not page.next_page_token
    assert sorted(n.order_id for n in page.notifications) == sorted(
        f"flood-{flood_customer}-{n}" for n in range(FLOOD)
    ), "each flooded order notified exactly once"
