"""Notifications in the service's database (a SQLite file or Postgres), shared by every
notifications instance, made from the orders' events through the inbox (meshkit.events.inbox):
each event's notification is written in the transaction that records the event as applied,
so none is made twice and none is lost.

An order's events name only the order; the customer is in its OrderPlaced, so that event is
kept (order_customers) and the later ones look the customer up. Instances share one durable
consumer, so an instance may get an OrderConfirmed before another instance has applied the
order's OrderPlaced: the event is then retried shortly after (RetryLater), not dropped.
Notifications are numbered by an integer sequence, which orders them (pages, watches)
whatever two instances' clocks say.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.notifications.v1 import notifications_pb2
from foodmesh.orders.v1 import events_pb2
from meshkit.events import ReceivedEvent, RetryLater, inbox
from meshkit.storage.database import DatabaseStore, Row, SqlTransaction, open_database
from meshkit.storage.schema import BigInt, Schema

Kind = notifications_pb2.NotificationKind

_METADATA = sa.MetaData()
SCHEMA = (
    inbox.SCHEMA,
    Schema.of(
        "notifications",
        sa.Table(
            "order_customers",
            _METADATA,
            sa.Column("order_id", sa.Text, primary_key=True),
            sa.Column("customer_id", sa.Text, nullable=False),
        ),
        sa.Table(
            "notifications",
            _METADATA,
            sa.Column("position", BigInt, primary_key=True),
            sa.Column("notification_id", sa.Text, nullable=False, unique=True),
            sa.Column("user_id", sa.Text, nullable=False),
            sa.Column("order_id", sa.Text, nullable=False),
            sa.Column("kind", BigInt, nullable=False),
            sa.Column("text", sa.Text, nullable=False),
            sa.Column("create_time", sa.Text, nullable=False),
            sa.Index("notifications_by_user", "user_id", "position"),
            sqlite_autoincrement=True,
        ),
    ),
)


def _text(event: Message) -> tuple[int, str] | None:
    """The notification an order event makes (kind, text), or None."""
    match event:
        case events_pb2.OrderConfirmed(order_id=order_id):
            return Kind.NOTIFICATION_KIND_ORDER_CONFIRMED, f"Your order {order_id} is confirmed."
        case events_pb2.OrderRejected(order_id=order_id, reason=reason):
            return (
                Kind.NOTIFICATION_KIND_ORDER_REJECTED,
                f"Your order {order_id} could not be placed: {reason}. Nothing was charged.",
            )
        case events_pb2.OrderPickedUp(order_id=order_id):
            return Kind.NOTIFICATION_KIND_ORDER_PICKED_UP, f"Your order {order_id} is on its way."
        case events_pb2.OrderDelivered(order_id=order_id):
            return Kind.NOTIFICATION_KIND_ORDER_DELIVERED, f"Your order {order_id} was delivered."
        case events_pb2.OrderCancelled(order_id=order_id):
            return (
                Kind.NOTIFICATION_KIND_ORDER_CANCELLED,
                f"Your order {order_id} is cancelled; your payment is returned.",
            )
    return None


NOTIFYING = (
    events_pb2.OrderConfirmed,
    events_pb2.OrderRejected,
    events_pb2.OrderPickedUp,
    events_pb2.OrderDelivered,
    events_pb2.OrderCancelled,
)
"""The order events that make a notification."""


@dataclass(frozen=True, slots=True)
class Page:
    notifications: list[notifications_pb2.Notification]
    last_position: int
    has_more: bool


class NotificationsStore(DatabaseStore):
    """Notifications by user, the order-to-customer map, and the consumer's inbox."""

    @classmethod
    async def open(cls, location: Path | str) -> Self:
        """Open (or create) the notifications database at `location` (a SQLite file's path
        or a `postgresql://` URL)."""
        return cls(await open_database(location, schema=SCHEMA))

    def handlers(
        self,
    ) -> Mapping[type[Message], Callable[[SqlTransaction, ReceivedEvent], Awaitable[None]]]:
        """The inbox handlers of the order events this store applies."""
        return {
            events_pb2.OrderPlaced: self._order_placed,
            **{event_type: self._notify for event_type in NOTIFYING},
        }

    async def _order_placed(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        assert isinstance(event.message, events_pb2.OrderPlaced)
        await transaction.execute(
            "INSERT INTO order_customers (order_id, customer_id) VALUES (?, ?)"
            " ON CONFLICT DO NOTHING",
            (event.message.order_id, event.message.customer_id),
        )

    async def _notify(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        made = _text(event.message)
        assert made is not None, event.type
        kind, text = made
        order_id = event.subject
        row = await transaction.fetch_one(
            "SELECT customer_id FROM order_customers WHERE order_id = ?", (order_id,)
        )
        if row is None:
            raise RetryLater(f"order {order_id!r}: its OrderPlaced is not applied yet")
        await transaction.execute(
            "INSERT INTO notifications (notification_id, user_id, order_id, kind, text,"
            " create_time) VALUES (?, ?, ?, ?, ?, ?)",
            (
                f"ntf_{uuid.uuid4().hex}",
                row["customer_id"],
                order_id,
                kind,
                text,
                datetime.now(UTC).isoformat(),
            ),
        )

    async def page(self, user_id: str, before_position: int, size: int) -> Page:
        """Up to `size` of the user's notifications, newest first, older than
        `before_position` (0: from the newest)."""
        rows = await self._database.fetch_all(
            # The CAST: Postgres would type a bare `? = 0` as INTEGER, too small for a
            # position (BIGINT).
            "SELECT * FROM notifications WHERE user_id = ?"
            " AND (CAST(? AS BIGINT) = 0 OR position < ?)"
            " ORDER BY position DESC LIMIT ?",
            (user_id, before_position, before_position, size + 1),
        )
        shown = rows[:size]
        return Page(
            [_message(row) for row in shown],
            int(shown[-1]["position"]) if shown else 0,
            len(rows) > size,
        )

    async def after(
        self, user_id: str, after_position: int, limit: int = 1000
    ) -> list[tuple[int, notifications_pb2.Notification]]:
        """The user's notifications after `after_position`, oldest first, with positions."""
        rows = await self._database.fetch_all(
            "SELECT * FROM notifications WHERE user_id = ? AND position > ?"
            " ORDER BY position LIMIT ?",
            (user_id, after_position, limit),
        )
        return [(int(row["position"]), _message(row)) for row in rows]

    async def count(self) -> int:
        row = await self._database.fetch_one("SELECT COUNT(*) FROM notifications")
        return int(row[0]) if row is not None else 0


def _message(row: Row) -> notifications_pb2.Notification:
    create_time = Timestamp()
    create_time.FromDatetime(datetime.fromisoformat(str(row["create_time"])))
    return notifications_pb2.Notification(
        notification_id=str(row["notification_id"]),
        user_id=str(row["user_id"]),
        order_id=str(row["order_id"]),
        kind=row["kind"],
        text=str(row["text"]),
        create_time=create_time,
    )
