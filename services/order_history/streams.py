"""What the order history reads: three bounded contexts' streams, their event types, and the
store's handlers for each; the live service and the rebuild consume the same."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.message import Message

from meshkit.events import Handler, StreamSpec, context_stream
from services.catalog.store import EVENT_TYPES as CATALOG_EVENTS
from services.delivery.store import EVENT_TYPES as DELIVERY_EVENTS
from services.order_history.store import OrderHistoryStore
from services.orders.state import EVENT_TYPES as ORDER_EVENTS

SERVICE = "order-history"


def consumed(
    store: OrderHistoryStore,
) -> list[tuple[StreamSpec, Iterable[type[Message]], Mapping[type[Message], Handler]]]:
    """(stream, its event types, the handlers) for each stream the read model is made of."""
    return [
        (context_stream("orders"), ORDER_EVENTS, store.order_handlers()),
        (context_stream("delivery"), DELIVERY_EVENTS, store.delivery_handlers()),
        (context_stream("catalog"), CATALOG_EVENTS, store.catalog_handlers()),
    ]
