"""NotificationsStore on a real database (a SQLite file, and a Postgres database), fed through
the inbox consumer's own `handle` with messages as JetStream delivers them (a stand-in for
the NATS message; no broker is reached): each order event makes one notification for the
order's customer however often it is delivered, and by however many instances at once; an
outcome that comes before its OrderPlaced is retried, not dropped; pages go newest first and
follow each other without repeats."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import cast

from google.protobuf.message import Message
from nats.aio.msg import Msg

from foodmesh.notifications.v1 import notifications_pb2
from foodmesh.orders.v1 import events_pb2
from meshkit.events import Broker, EventConsumer, context_stream
from meshkit.events.relay import event_id
from services.notifications.store import NotificationsStore
from services.orders.state import EVENT_TYPES as ORDER_EVENTS
from tests.conftest import Locate

Kind = notifications_pb2.NotificationKind
ORDERS = context_stream("orders")


@dataclass
class Delivered:
    """What EventConsumer.handle reads of a JetStream message, and what it answered."""

    headers: dict[str, str]
    data: bytes
    metadata: SimpleNamespace
    answers: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.answers.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.answers.append("nak")

    async def in_progress(self) -> None:
        self.answers.append("in progress")

    async def term(self) -> None:
        self.answers.append("term")


def delivered(order_id: str, version: int, event: Message, delivery: int = 1) -> Delivered:
    """The order's event `version` as the ORDERS stream delivers it (the `delivery`th time)."""
    return Delivered(
        headers={
            "ce-specversion": "1.0",
            "ce-id": event_id(order_id, version),
            "ce-source": "/foodmesh/orders",
            "ce-type": event.DESCRIPTOR.full_name,
            "ce-subject": order_id,
            "ce-time": datetime(2026, 12, 3, 10, 0, version, tzinfo=UTC).isoformat(),
        },
        data=event.SerializeToString(),
        metadata=SimpleNamespace(num_delivered=delivery, stream="ORDERS"),
    )


def consumer(store: NotificationsStore) -> EventConsumer:
    """A notifications instance's consumer; `handle` never reaches the broker but to
    dead-letter, which nothing here does."""
    return EventConsumer(
        Broker("nats://127.0.0.1:1", "unused"),
        store.database,
        stream=ORDERS,
        durable="notifications",
        event_types=ORDER_EVENTS,
        handlers=store.handlers(),
    )


async def handle(running: EventConsumer, message: Delivered) -> str | None:
    return await running.handle(cast(Msg, message))


def placed(order_id: str, customer: str = "ada") -> events_pb2.OrderPlaced:
    return events_pb2.OrderPlaced(order_id=order_id, customer_id=customer)


async def test_each_outcome_of_an_order_notifies_its_customer(locate: Locate) -> None:
    async with await NotificationsStore.open(locate("notifications")) as store:
        running = consumer(store)
        events: list[Message] = [
            placed("o1"),
            events_pb2.PaymentAuthorized(order_id="o1"),  # no handler: acked, nothing made
            events_pb2.OrderConfirmed(order_id="o1"),
            events_pb2.OrderPickedUp(order_id="o1"),
            events_pb2.OrderDelivered(order_id="o1"),
        ]
        outcomes = [
            await handle(running, delivered("o1", version, event))
            for version, event in enumerate(events, start=1)
        ]
        assert outcomes == ["applied", None, "applied", "applied", "applied"]
        page = await store.page("ada", 0, 10)
        after = await store.after("ada", 0)
        assert await store.count() == 3
        assert await store.page("bob", 0, 10) == type(page)([], 0, False)
    assert [n.kind for n in page.notifications] == [
        Kind.NOTIFICATION_KIND_ORDER_DELIVERED,
        Kind.NOTIFICATION_KIND_ORDER_PICKED_UP,
        Kind.NOTIFICATION_KIND_ORDER_CONFIRMED,
    ]  # newest first
    assert page.notifications[-1].text == "Your order o1 is confirmed."
    assert all((n.user_id, n.order_id) == ("ada", "o1") for n in page.notifications)
    assert len({n.notification_id for n in page.notifications}) == 3
    assert not page.has_more
    assert [n for _, n in after] == page.notifications[::-1]  # oldest first
    positions = [position for position, _ in after]
    assert positions == sorted(positions) and page.last_position == positions[0]


async def test_an_event_delivered_again_makes_no_second_notification(locate: Locate) -> None:
    async with await NotificationsStore.open(locate("notifications")) as store:
        running = consumer(store)
        assert await handle(running, delivered("o1", 1, placed("o1"))) == "applied"
        confirmed = events_pb2.OrderConfirmed(order_id="o1")
        first = delivered("o1", 2, confirmed)
        again = delivered("o1", 2, confirmed, delivery=2)  # its ack was lost
        assert await handle(running, first) == "applied"
        assert await handle(running, again) == "duplicate"
        assert first.answers == again.answers == ["ack"]
        assert await handle(running, delivered("o1", 1, placed("o1", "eve"), 2)) == "duplicate"
        assert await store.count() == 1
        assert [n.user_id for n in (await store.page("ada", 0, 10)).notifications] == ["ada"]


async def test_instances_handling_one_event_at_once_make_one_notification(
    locate: Locate,
) -> None:
    """Two instances on one database (as after a redelivery to the other): the inbox row
    and the effect commit together, so exactly one of the racing deliveries applies it."""
    async with (
        await NotificationsStore.open(locate("notifications")) as one,
        await NotificationsStore.open(locate("notifications")) as two,
    ):
        consumers = [consumer(one), consumer(two)]
        assert await handle(consumers[0], delivered("o1", 1, placed("o1"))) == "applied"
        confirmed = events_pb2.OrderConfirmed(order_id="o1")
        outcomes = await asyncio.gather(
            *(
                handle(consumers[n % 2], delivered("o1", 2, confirmed, delivery=n + 1))
                for n in range(8)
            )
        )
        assert sorted(o or "" for o in outcomes) == ["applied"] + ["duplicate"] * 7
        assert await one.count() == await two.count() == 1
        assert sum(c.applied for c in consumers) == 2  # the OrderPlaced, and one outcome


async def test_an_outcome_before_its_order_placed_is_retried_and_then_applied(
    locate: Locate,
) -> None:
    async with await NotificationsStore.open(locate("notifications")) as store:
        running = consumer(store)
        rejected = events_pb2.OrderRejected(order_id="o1", reason="declined")
        early = delivered("o1", 2, rejected)
        assert await handle(running, early) == "retried"
        assert early.answers == ["nak"]
        assert await store.count() == 0  # and the inbox does not hold it: it comes again
        assert await handle(running, delivered("o1", 1, placed("o1"))) == "applied"
        assert await handle(running, delivered("o1", 2, rejected, delivery=2)) == "applied"
        [notification] = (await store.page("ada", 0, 10)).notifications
    assert notification.kind == Kind.NOTIFICATION_KIND_ORDER_REJECTED
    assert "declined" in notification.text


async def test_pages_follow_each_other_newest_first_without_repeats(locate: Locate) -> None:
    async with await NotificationsStore.open(locate("notifications")) as store:
        running = consumer(store)
        for n in range(5):
            order_id = f"o{n}"
            await handle(running, delivered(order_id, 1, placed(order_id)))
            confirmed = events_pb2.OrderConfirmed(order_id=order_id)
            await handle(running, delivered(order_id, 2, confirmed))
        await handle(running, delivered("x", 1, placed("x", "bob")))
        await handle(running, delivered("x", 2, events_pb2.OrderConfirmed(order_id="x")))
        pages = [await store.page("ada", 0, 2)]
        while pages[-1].has_more:
            pages.append(await store.page("ada", pages[-1].last_position, 2))
        newer = await store.after("ada", pages[0].last_position)
        beyond_int32 = await store.page("ada", 2**40, 10)  # a position is a BIGINT
    assert [len(p.notifications) for p in pages] == [2, 2, 1]
    shown = [n.order_id for p in pages for n in p.notifications]
    assert shown == ["o4", "o3", "o2", "o1", "o0"]
    assert [n.order_id for _, n in newer] == ["o4"]
    assert [n.order_id for n in beyond_int32.notifications] == shown
