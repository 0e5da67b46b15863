"""The order history read model in the service's database (a SQLite file or Postgres), shared
by every order-history instance, made only from events: the orders' (ORDERS), delivery's
(DELIVERY) and the catalog's (CATALOG), each applied once through the inbox
(meshkit.events.inbox) in the transaction of its effect.

Three streams, several instances and a rebuild from scratch mean events of one order come in
any order: an OrderConfirmed before its OrderPlaced (another instance's batch), a
CourierAssigned before both (another stream), an order's items before the catalog's names.
So every handler is order-free: an event upserts only the columns it owns, the status is the
one of the order's latest event by version in its stream (meshkit.events.relay's ids carry
it), a catalog name is replaced only by a later version of it, and the names are joined in
at query time. Whatever order the events came in, the same events give the same answers:
what the rebuild relies on. No handler has to wait for another (no RetryLater).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.catalog.v1 import events_pb2 as catalog_events
from foodmesh.delivery.v1 import events_pb2 as delivery_events
from foodmesh.orderhistory.v1 import orderhistory_pb2
from foodmesh.orders.v1 import events_pb2 as order_events
from foodmesh.orders.v1 import orders_pb2
from meshkit.events import Handler, ReceivedEvent, inbox
from meshkit.events.relay import event_version
from meshkit.storage.database import DatabaseStore, Row, SqlTransaction, open_database
from meshkit.storage.schema import BigInt, Schema

Status = orders_pb2.OrderStatus

_METADATA = sa.MetaData()
SCHEMA = (
    inbox.SCHEMA,
    Schema.of(
        "order_history",
        # An order's row; `create_time` is NULL until its OrderPlaced is applied (not listed).
        sa.Table(
            "history_orders",
            _METADATA,
            sa.Column("order_id", sa.Text, primary_key=True),
            sa.Column("customer_id", sa.Text),
            sa.Column("restaurant_id", sa.Text),
            sa.Column("total_cents", BigInt),
            sa.Column("currency", sa.Text),
            sa.Column("delivery_address", sa.Text),
            sa.Column("create_time", sa.Text),
            sa.Column("rejection_reason", sa.Text, nullable=False, server_default=""),
            sa.Column("courier_id", sa.Text, nullable=False, server_default=""),
            sa.Column("eta_time", sa.Text),
            sa.Column("delivery_version", BigInt, nullable=False, server_default="0"),
            sa.Index("history_by_customer", "customer_id", "create_time", "order_id"),
        ),
        sa.Table(
            "history_lines",
            _METADATA,
            sa.Column("order_id", sa.Text, primary_key=True),
            sa.Column("line", BigInt, primary_key=True),
            sa.Column("item_id", sa.Text, nullable=False),
            sa.Column("quantity", BigInt, nullable=False),
            sa.Column("unit_price_cents", BigInt, nullable=False),
        ),
        sa.Table(
            "history_timeline",
            _METADATA,
            sa.Column("order_id", sa.Text, primary_key=True),
            sa.Column("version", BigInt, primary_key=True),
            sa.Column("status", BigInt, nullable=False),
            sa.Column("time", sa.Text, nullable=False),
            sa.Column("event_type", sa.Text, nullable=False),
        ),
        sa.Table(
            "catalog_names",
            _METADATA,
            sa.Column(
                "kind",
                sa.Text,
                sa.CheckConstraint("kind IN ('item', 'restaurant')"),
                primary_key=True,
            ),
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("version", BigInt, nullable=False),
        ),
    ),
)

STATUS_OF: Mapping[type[Message], int] = {
    order_events.OrderPlaced: Status.ORDER_STATUS_PENDING,
    order_events.OrderConfirmed: Status.ORDER_STATUS_CONFIRMED,
    order_events.OrderRejected: Status.ORDER_STATUS_REJECTED,
    order_events.OrderCancelled: Status.ORDER_STATUS_CANCELLED,
    order_events.OrderPickedUp: Status.ORDER_STATUS_OUT_FOR_DELIVERY,
    order_events.OrderDelivered: Status.ORDER_STATUS_DELIVERED,
}
"""The order events that change the status a customer sees, and the status they set."""


def _stamp(moment: datetime) -> str:
    """A sortable text form of a time (UTC, microseconds)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _timestamp(text: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(text))
    return stamp


@dataclass(frozen=True, slots=True)
class Page:
    orders: list[orderhistory_pb2.CustomerOrder]
    has_more: bool
    last_key: str
    """The sort key of the page's last order (`<create_time> <order_id>`)."""


class OrderHistoryStore(DatabaseStore):
    """Customers' orders as the events tell them, and the consumers' inbox."""

    @classmethod
    async def open(cls, location: Path | str) -> Self:
        """Open (or create) the order history database at `location` (a SQLite file's path
        or a `postgresql://` URL)."""
        return cls(await open_database(location, schema=SCHEMA))

    def order_handlers(self) -> Mapping[type[Message], Handler]:
        """The inbox handlers of the orders' events (ORDERS)."""
        return {
            **{event_type: self._status_changed for event_type in STATUS_OF},
            order_events.OrderPlaced: self._order_placed,  # which records its status too
        }

    def delivery_handlers(self) -> Mapping[type[Message], Handler]:
        """The inbox handlers of delivery's events (DELIVERY)."""
        return {
            delivery_events.CourierAssigned: self._courier_assigned,
            delivery_events.DeliveryCancelled: self._delivery_cancelled,
        }

    def catalog_handlers(self) -> Mapping[type[Message], Handler]:
        """The inbox handlers of the catalog's events (CATALOG)."""
        return {
            catalog_events.ItemChanged: self._item_changed,
            catalog_events.RestaurantChanged: self._restaurant_changed,
        }

    async def _order_placed(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        placed = event.message
        assert isinstance(placed, order_events.OrderPlaced)
        await transaction.execute(
            "INSERT INTO history_orders (order_id, customer_id, restaurant_id, total_cents,"
            " currency, delivery_address, create_time) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (order_id) DO UPDATE SET customer_id = excluded.customer_id,"
            " restaurant_id = excluded.restaurant_id, total_cents = excluded.total_cents,"
            " currency = excluded.currency, delivery_address = excluded.delivery_address,"
            " create_time = excluded.create_time",
            (
                placed.order_id,
                placed.customer_id,
                placed.restaurant_id,
                placed.total_cents,
                placed.currency,
                placed.delivery_address,
                _stamp(placed.create_time.ToDatetime(tzinfo=UTC)),
            ),
        )
        await transaction.execute_many(
            "INSERT INTO history_lines (order_id, line, item_id, quantity, unit_price_cents)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (order_id, line) DO UPDATE SET"
            " item_id = excluded.item_id, quantity = excluded.quantity,"
            " unit_price_cents = excluded.unit_price_cents",
            [
                (placed.order_id, number, line.item_id, line.quantity, line.unit_price_cents)
                for number, line in enumerate(placed.lines)
            ],
        )
        await self._status_changed(transaction, event)

    async def _status_changed(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        order_id = event.subject
        await transaction.execute(
            "INSERT INTO history_orders (order_id) VALUES (?) ON CONFLICT DO NOTHING", (order_id,)
        )
        await transaction.execute(
            "INSERT INTO history_timeline (order_id, version, status, time, event_type)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (order_id, version) DO NOTHING",
            (
                order_id,
                event_version(event.id),
                STATUS_OF[type(event.message)],
                _stamp(event.time),
                event.type,
            ),
        )
        if isinstance(event.message, order_events.OrderRejected):
            await transaction.execute(
                "UPDATE history_orders SET rejection_reason = ? WHERE order_id = ?",
                (event.message.reason, order_id),
            )

    async def _courier_assigned(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        assigned = event.message
        assert isinstance(assigned, delivery_events.CourierAssigned)
        await self._delivery(
            transaction,
            event,
            assigned.order_id,
            assigned.courier_id,
            _stamp(assigned.eta_time.ToDatetime(tzinfo=UTC)),
        )

    async def _delivery_cancelled(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        cancelled = event.message
        assert isinstance(cancelled, delivery_events.DeliveryCancelled)
        await self._delivery(transaction, event, cancelled.order_id, "", None)

    async def _delivery(
        self,
        transaction: SqlTransaction,
        event: ReceivedEvent,
        order_id: str,
        courier_id: str,
        eta_time: str | None,
    ) -> None:
        """The delivery's latest courier and arrival time (by version in its stream)."""
        version = event_version(event.id)
        await transaction.execute(
            "INSERT INTO history_orders (order_id, courier_id, eta_time, delivery_version)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (order_id) DO UPDATE SET"
            " courier_id = excluded.courier_id, eta_time = excluded.eta_time,"
            " delivery_version = excluded.delivery_version"
            " WHERE excluded.delivery_version > history_orders.delivery_version",
            (order_id, courier_id, eta_time, version),
        )

    async def _item_changed(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        changed = event.message
        assert isinstance(changed, catalog_events.ItemChanged)
        await self._name(transaction, "item", changed.item.item_id, changed.item.name, event)

    async def _restaurant_changed(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        changed = event.message
        assert isinstance(changed, catalog_events.RestaurantChanged)
        await self._name(transaction, "restaurant", changed.restaurant_id, changed.name, event)

    async def _name(
        self, transaction: SqlTransaction, kind: str, id_: str, name: str, event: ReceivedEvent
    ) -> None:
        await transaction.execute(
            "INSERT INTO catalog_names (kind, id, name, version) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name,"
            " version = excluded.version WHERE excluded.version > catalog_names.version",
            (kind, id_, name, event_version(event.id)),
        )

    async def page(self, customer_id: str, before_key: str, size: int) -> Page:
        """Up to `size` of the customer's placed orders, newest first, after the one whose
        sort key is `before_key` ("" = from the newest)."""
        before_time, _, before_order = before_key.partition(" ")
        async with self._database.snapshot() as snapshot:  # one answer, from one moment
            return await self._page(
                snapshot, customer_id, (before_key, before_time, before_order), size
            )

    async def _page(
        self, snapshot: SqlTransaction, customer_id: str, before: tuple[str, str, str], size: int
    ) -> Page:
        rows = await snapshot.fetch_all(
            "SELECT o.*, r.name AS restaurant_name FROM history_orders o"
            " LEFT JOIN catalog_names r ON r.kind = 'restaurant' AND r.id = o.restaurant_id"
            " WHERE o.customer_id = ? AND o.create_time IS NOT NULL"
            " AND (? = '' OR (o.create_time, o.order_id) < (?, ?))"
            " ORDER BY o.create_time DESC, o.order_id DESC LIMIT ?",
            (customer_id, *before, size + 1),
        )
        shown = rows[:size]
        ids = [str(row["order_id"]) for row in shown]
        lines, timelines = await _details(snapshot, ids)
        orders = [_order(row, lines[row["order_id"]], timelines[row["order_id"]]) for row in shown]
        last = f"{shown[-1]['create_time']} {shown[-1]['order_id']}" if shown else ""
        return Page(orders, len(rows) > size, last)

    async def count(self) -> int:
        """The orders whose OrderPlaced is applied."""
        row = await self._database.fetch_one(
            "SELECT COUNT(*) FROM history_orders WHERE create_time IS NOT NULL"
        )
        return int(row[0]) if row is not None else 0


async def _details(
    snapshot: SqlTransaction, order_ids: Sequence[str]
) -> tuple[
    dict[str, list[orderhistory_pb2.OrderedItem]], dict[str, list[orderhistory_pb2.StatusChange]]
]:
    lines: dict[str, list[orderhistory_pb2.OrderedItem]] = defaultdict(list)
    timelines: dict[str, list[orderhistory_pb2.StatusChange]] = defaultdict(list)
    if not order_ids:
        return lines, timelines
    marks = ", ".join("?" * len(order_ids))
    line_rows = await snapshot.fetch_all(
        "SELECT l.*, n.name FROM history_lines l LEFT JOIN catalog_names n"
        " ON n.kind = 'item' AND n.id = l.item_id"
        f" WHERE l.order_id IN ({marks}) ORDER BY l.order_id, l.line",
        order_ids,
    )
    change_rows = await snapshot.fetch_all(
        f"SELECT * FROM history_timeline WHERE order_id IN ({marks}) ORDER BY order_id, version",
        order_ids,
    )
    for row in line_rows:
        lines[row["order_id"]].append(
            orderhistory_pb2.OrderedItem(
                item_id=row["item_id"],
                name=row["name"] or "",
                quantity=row["quantity"],
                unit_price_cents=row["unit_price_cents"],
            )
        )
    for row in change_rows:
        timelines[row["order_id"]].append(
            orderhistory_pb2.StatusChange(
                status=row["status"], time=_timestamp(row["time"]), event_type=row["event_type"]
            )
        )
    return lines, timelines


def _order(
    row: Row,
    lines: list[orderhistory_pb2.OrderedItem],
    timeline: list[orderhistory_pb2.StatusChange],
) -> orderhistory_pb2.CustomerOrder:
    order = orderhistory_pb2.CustomerOrder(
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        status=timeline[-1].status if timeline else Status.ORDER_STATUS_UNSPECIFIED,
        restaurant_id=row["restaurant_id"],
        restaurant_name=row["restaurant_name"] or "",
        items=lines,
        total_cents=row["total_cents"],
        currency=row["currency"],
        delivery_address=row["delivery_address"],
        create_time=_timestamp(row["create_time"]),
        timeline=timeline,
        rejection_reason=row["rejection_reason"],
        courier_id=row["courier_id"],
    )
    if row["eta_time"]:
        order.eta_time.CopyFrom(_timestamp(row["eta_time"]))
    return order
