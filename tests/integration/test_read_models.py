"""Events end to end: orders' outbox relayed to a real nats-server, consumed by two
notifications instances that share one durable consumer and one database, read back through
NotificationService. Counts come from the services' own APIs and the broker's consumer
state."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

import mesh
from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from foodmesh.orders.v1 import orders_pb2
from tests.integration.conftest import LONG_TRIPS, Stack, order, stack_under
from tests.integration.platform import clients, notified_exactly_once, scrape, value

Kind = notifications_pb2.NotificationKind
DECLINED = "pm_card_chargeDeclined"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """Consul, NATS, the platform with two orders instances, two notifications instances."""
    with stack_under(tmp_path_factory.mktemp("notifications")) as stack:
        stack.start_nats()
        stack.start("notifications")
        stack.start("notifications")
        stack.start_platform(orders=2, delivery=LONG_TRIPS)
        stack.wait_passing("notifications", 2)
        yield stack, stack.customer()


async def test_each_checkout_makes_exactly_one_notification_of_its_outcome(
    platform: tuple[Stack, str],
) -> None:
    stack, _ = platform
    customer = stack.customer(f"{uuid.uuid4().hex[:8]}@example.com")
    cards = ["pm_card_visa"] * 12 + [DECLINED] * 4
    async with clients(stack) as c:
        placed = await asyncio.gather(
            *(
                c.orders.PlaceOrder(
                    order(uuid.uuid4().hex, customer=customer, payment_method=card), timeout=30
                )
                for card in cards
            )
        )
        expected = {
            p.order_id: (
                Kind.NOTIFICATION_KIND_ORDER_CONFIRMED
                if p.status == orders_pb2.ORDER_STATUS_CONFIRMED
                else Kind.NOTIFICATION_KIND_ORDER_REJECTED
            )
            for p in placed
        }
        assert Counter(expected.values()) == {
            Kind.NOTIFICATION_KIND_ORDER_CONFIRMED: 12,
            Kind.NOTIFICATION_KIND_ORDER_REJECTED: 4,
        }
        found = await notified_exactly_once(stack, customer, placed)
    assert all(n.user_id == customer and n.text and n.notification_id for n in found)
    assert len({n.notification_id for n in found}) == len(found)
    rejected = [n for n in found if n.kind == Kind.NOTIFICATION_KIND_ORDER_REJECTED]
    assert all("generic_decline" in n.text for n in rejected)
    # The instances' own counts: each order's OrderPlaced and its outcome were applied.
    applied = [
        value(scrape(stack, "notifications", p.port), "foodmesh_events_processed_total",
              stream="ORDERS", consumer="notifications", outcome="applied")
        for p in stack.processes if p.name == "notifications"
    ]  # fmt: skip
    assert sum(applied) >= 2 * len(placed)  # each order's OrderPlaced and its outcome


async def test_a_watch_sends_what_there_is_then_each_new_notification(
    platform: tuple[Stack, str],
) -> None:
    stack, _ = platform
    customer = stack.customer(f"{uuid.uuid4().hex[:8]}@example.com")
    async with (
        clients(stack) as c,
        mesh.channel("notifications", consul=stack.settings) as channel,
    ):
        stub = notifications_pb2_grpc.NotificationServiceStub(channel)
        first = await c.orders.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=30)
        watch = stub.WatchNotifications(
            notifications_pb2.WatchNotificationsRequest(user_id=customer), timeout=30
        )
        seen = [await watch.read()]
        assert seen[0].order_id == first.order_id
        second = await c.orders.PlaceOrder(
            order(uuid.uuid4().hex, customer=customer, payment_method=DECLINED), timeout=30
        )
        seen.append(await watch.read())
        watch.cancel()
    assert [(n.order_id, n.kind) for n in seen] == [
        (first.order_id, Kind.NOTIFICATION_KIND_ORDER_CONFIRMED),
        (second.order_id, Kind.NOTIFICATION_KIND_ORDER_REJECTED),
    ]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (notifications_pb2.ListNotificationsRequest(user_id=""), "user_id"),
        (notifications_pb2.ListNotificationsRequest(user_id="u", page_size=-1), "page_size"),
        (notifications_pb2.ListNotificationsRequest(user_id="u", page_token="%%%"), "page_token"),
    ],
)
async def test_bad_list_requests_are_invalid_argument_naming_the_field(
    platform: tuple[Stack, str], request_: notifications_pb2.ListNotificationsRequest, field: str
) -> None:
    stack, _ = platform
    async with mesh.channel("notifications", consul=stack.settings) as channel:
        stub = notifications_pb2_grpc.NotificationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListNotifications(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")
