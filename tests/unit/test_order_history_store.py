"""The order history's handlers are order-free: the same events, applied in any order (as
several instances, three streams and a rebuild deliver them), give the same answers; on a
SQLite file and on a Postgres database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.catalog.v1 import catalog_pb2
from foodmesh.catalog.v1 import events_pb2 as catalog_events
from foodmesh.delivery.v1 import events_pb2 as delivery_events
from foodmesh.orders.v1 import events_pb2 as order_events
from foodmesh.orders.v1 import orders_pb2
from meshkit.events import ReceivedEvent
from meshkit.events.relay import event_id
from services.order_history.store import OrderHistoryStore
from tests.conftest import Locate

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
Status = orders_pb2.OrderStatus


def _at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(T0 + timedelta(seconds=seconds))
    return stamp


def _event(stream_id: str, version: int, message: Message, seconds: float) -> ReceivedEvent:
    return ReceivedEvent(
        message, event_id(stream_id, version), "test", message.DESCRIPTOR.full_name,
        stream_id, T0 + timedelta(seconds=seconds), "TEST", 1,
    )  # fmt: skip


def _item(name: str) -> catalog_pb2.Item:
    return catalog_pb2.Item(item_id="soup", restaurant_id="sakura", name=name, currency="EUR")


def history_events() -> list[ReceivedEvent]:
    """Two orders of one customer (one delivered, one rejected), their courier, and the
    catalog's names (the soup renamed once)."""
    line = orders_pb2.OrderLine(item_id="soup", quantity=2, unit_price_cents=350)
    events = []
    for order_id, at in (("o1", 0.0), ("o2", 10.0)):
        placed = order_events.OrderPlaced(
            order_id=order_id, customer_id="ada", restaurant_id="sakura", lines=[line],
            total_cents=700, currency="EUR", delivery_address="1 Test St", create_time=_at(at),
        )  # fmt: skip
        events.append(_event(order_id, 1, placed, at))
    events += [
        _event("o1", 2, order_events.PaymentAuthorized(order_id="o1"), 1),
        _event("o1", 3, order_events.OrderConfirmed(order_id="o1"), 2),
        _event("o1", 4, order_events.OrderPickedUp(order_id="o1"), 3),
        _event("o1", 5, order_events.OrderDelivered(order_id="o1"), 4),
        _event("o2", 2, order_events.OrderRejected(order_id="o2", reason="declined"), 11),
        _event(
            "d1",
            1,
            delivery_events.CourierAssigned(
                delivery_id="d1", order_id="o1", courier_id="c7", eta_time=_at(30)
            ),
            1.5,
        ),
        _event("sakura", 1, catalog_events.RestaurantChanged(restaurant_id="sakura", name="Sa"), 0),
        _event("soup", 1, catalog_events.ItemChanged(item=_item("Soup")), 0),
        _event("soup", 2, catalog_events.ItemChanged(item=_item("Miso Soup")), 5),
    ]
    return events


async def _apply(store: OrderHistoryStore, events: list[ReceivedEvent]) -> None:
    handlers = {**store.order_handlers(), **store.delivery_handlers(), **store.catalog_handlers()}
    for event in events:
        handler = handlers.get(type(event.message))
        if handler is not None:
            async with store.database.transaction() as transaction:
                await handler(transaction, event)


async def test_in_stream_order_the_history_tells_each_order_with_names_and_timeline(
    locate: Locate,
) -> None:
    async with await OrderHistoryStore.open(locate("order-history")) as store:
        await _apply(store, history_events())
        page = await store.page("ada", "", 10)
    assert [o.order_id for o in page.orders] == ["o2", "o1"]  # newest first
    rejected, delivered = page.orders
    assert rejected.status == Status.ORDER_STATUS_REJECTED
    assert rejected.rejection_reason == "declined"
    assert [c.status for c in delivered.timeline] == [
        Status.ORDER_STATUS_PENDING,
        Status.ORDER_STATUS_CONFIRMED,
        Status.ORDER_STATUS_OUT_FOR_DELIVERY,
        Status.ORDER_STATUS_DELIVERED,
    ]
    assert delivered.status == Status.ORDER_STATUS_DELIVERED
    assert delivered.restaurant_name == "Sa"
    assert [(i.name, i.quantity) for i in delivered.items] == [("Miso Soup", 2)]
    assert delivered.courier_id == "c7"
    assert delivered.eta_time == _at(30)
    assert delivered.timeline[1].time == _at(2)


@pytest.mark.parametrize("seed", range(8))
async def test_any_order_of_the_same_events_gives_the_same_answers(
    locate: Locate, seed: int
) -> None:
    async with await OrderHistoryStore.open(locate("ordered")) as store:
        await _apply(store, history_events())
        expected = await store.page("ada", "", 10)
    shuffled = history_events()
    random.Random(seed).shuffle(shuffled)
    async with await OrderHistoryStore.open(locate("shuffled")) as store:
        await _apply(store, shuffled)
        assert await store.page("ada", "", 10) == expected


async def test_pages_follow_each_other_without_repeats(locate: Locate) -> None:
    async with await OrderHistoryStore.open(locate("order-history")) as store:
        await _apply(store, history_events())
        first = await store.page("ada", "", 1)
        second = await store.page("ada", first.last_key, 1)
        assert await store.page("nobody", "", 10) == type(first)([], False, "")
    assert first.has_more and not second.has_more
    assert [o.order_id for o in first.orders + second.orders] == ["o2", "o1"]
