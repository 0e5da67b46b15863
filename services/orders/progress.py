"""The trip's progress on an order, from delivery's events (stream DELIVERY, the durable
consumer `orders` that every orders instance shares): PickedUp moves a CONFIRMED order to
OUT_FOR_DELIVERY, Delivered moves it to DELIVERED. What it records is appended to the order's
stream in the transaction that records the event in the inbox (meshkit.events.inbox), so each
happens once, whatever the redeliveries; the append's version check orders it against the
saga's own records.

The events may come before the saga has written down what they follow (another instance's
saga still capturing the payment when the courier is quick): they are then tried again a
little later (RetryLater), not dropped. A delivery that is not the order's (one a saga
cancelled) changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from foodmesh.delivery.v1 import events_pb2 as delivery_events
from foodmesh.orders.v1 import events_pb2
from meshkit.events import Handler, ReceivedEvent, RetryLater
from meshkit.storage.database import SqlTransaction
from services.orders.state import OrderStatus
from services.orders.store import OrdersStore

DELIVERY_EVENTS: tuple[type[Message], ...] = (
    delivery_events.CourierAssigned,
    delivery_events.PickedUp,
    delivery_events.Delivered,
    delivery_events.DeliveryCancelled,
)
"""What the DELIVERY stream carries (the consumer knows them all, and acts on two)."""


class DeliveryProgress:
    """Applies delivery's PickedUp and Delivered to the orders they are for."""

    def __init__(self, store: OrdersStore) -> None:
        self._store = store

    def handlers(self) -> Mapping[type[Message], Handler]:
        return {delivery_events.PickedUp: self.apply, delivery_events.Delivered: self.apply}

    async def apply(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        message = event.message
        assert isinstance(message, delivery_events.PickedUp | delivery_events.Delivered)
        try:
            state, version = await self._store.load_in(transaction, message.order_id)
        except KeyError:
            raise RetryLater(f"order {message.order_id!r} is not known (yet)") from None
        if state.delivery_id != message.delivery_id:
            if not state.delivery_id and not state.final:
                raise RetryLater(f"order {state.order_id!r}: its delivery is not recorded yet")
            return  # a delivery the saga cancelled, not the order's
        if state.status is OrderStatus.PENDING:
            raise RetryLater(f"order {state.order_id!r}: its checkout is not settled yet")
        recorded: list[Message] = []
        if state.status is OrderStatus.CONFIRMED:
            recorded.append(events_pb2.OrderPickedUp(order_id=state.order_id))
        delivered = isinstance(message, delivery_events.Delivered)
        if delivered and state.status in (OrderStatus.CONFIRMED, OrderStatus.OUT_FOR_DELIVERY):
            recorded.append(events_pb2.OrderDelivered(order_id=state.order_id))
        if recorded:
            await self._store.append(transaction, state.order_id, version, recorded)
