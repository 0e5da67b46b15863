"""Orders as event streams in the orders database (SQLite or Postgres), shared by every orders
instance, with a projection table for queries kept in the same transaction as each append.

An order's stream (meshkit.events) is its truth; `order_views` holds each order's current
wire form, its status and its stream version, rewritten by every append, so a read is one row
and never a fold. Placing an order is one transaction: the OrderPlaced event, the view, and
the PlaceOrder idempotency key (meshkit.storage.idempotency, whose recorded response is the
order's id), so of two concurrent duplicates the second finds the first's order. The checkout
saga's journal is this store: `record` appends a step's events at the version it read
(StaleStream if another writer got there first) and rewrites the view, one transaction per
step, which also renews the saga's lease (meshkit.storage.lease, in the same database):
placing an order takes it, and the record that ends the saga gives it up, so that a checkout
costs five transactions in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from google.protobuf.message import Message

from foodmesh.orders.v1 import events_pb2, orders_pb2
from meshkit.events import EventStore, inbox, relay
from meshkit.events import store as event_store
from meshkit.storage import idempotency, lease
from meshkit.storage.database import Database, DatabaseStore, Queries, SqlTransaction, open_database
from meshkit.storage.idempotency import IdempotencyKey, IdempotencyLedger
from meshkit.storage.lease import Fence, LeaseLost, Leases
from meshkit.storage.schema import BigInt, Schema
from services.orders.state import EVENT_TYPES, OrderState, fold, order_message

SCHEMA = (
    event_store.SCHEMA,
    idempotency.SCHEMA,
    lease.SCHEMA,
    relay.SCHEMA,
    inbox.SCHEMA,
    Schema.of(
        "orders",
        sa.Table(
            "order_views",
            sa.MetaData(),
            sa.Column("order_id", sa.Text, primary_key=True),
            sa.Column("customer_id", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("version", BigInt, nullable=False),
            sa.Column("saga_ended", BigInt, nullable=False),
            sa.Column("data", sa.LargeBinary, nullable=False),
            sa.Index("order_views_unfinished", "saga_ended"),
        ),
    ),
)

PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"


class OrdersStore(DatabaseStore):
    """Order streams, their views, PlaceOrder's idempotency keys and the saga leases."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.events = EventStore(EVENT_TYPES)
        self.placing = IdempotencyLedger(PLACE_ORDER)

    @classmethod
    async def open(cls, location: Path | str) -> Self:
        """Open (or create) the orders database at `location` (a SQLite file's path or a
        `postgresql://` URL)."""
        return cls(await open_database(location, schema=SCHEMA))

    async def order_for_key(self, key: IdempotencyKey | None) -> OrderState | None:
        """The order an earlier PlaceOrder with this key created (IdempotencyConflict when
        the key came with another request), or None."""
        # Two single queries, no transaction: a stream only grows, so the order read after
        # its key is at least the one the key was stored with.
        return await self._order_for_key(self._database, key)

    async def place(
        self,
        placed: events_pb2.OrderPlaced,
        key: IdempotencyKey | None,
        leases: Leases | None = None,
    ) -> tuple[OrderState, bool]:
        """Start the order's stream with `placed`; (the order, True). With a key already
        used by the same request: (that order, False), nothing stored. `leases`: take the
        new order's saga lease in the same transaction (`SagaRunner.start(leased=True)`)."""
        async with self._database.transaction() as transaction:
            earlier = await self._order_for_key(transaction, key)
            if earlier is not None:
                return earlier, False
            state, _ = await self._append(transaction, placed.order_id, 0, [placed])
            await self.placing.remember(
                transaction, key, orders_pb2.GetOrderRequest(order_id=placed.order_id)
            )
            if leases is not None and not await leases.take(placed.order_id, transaction):
                raise LeaseLost(placed.order_id)  # a new order's lease is nobody's: a bug
        return state, True

    async def load(self, order_id: str) -> tuple[OrderState, int]:
        """The order's state folded from its stream, and its version; KeyError if unknown."""
        recorded = await self.events.read(self._database, order_id)
        if not recorded:
            raise KeyError(order_id)
        return fold((r.event, r.recorded_at) for r in recorded), recorded[-1].version

    async def record(
        self, order_id: str, version: int, events: Sequence[Message], fence: Fence | None = None
    ) -> tuple[OrderState, int]:
        """Append events after `version` and rewrite the view (StaleStream if the order
        moved on); the new state and version. `fence` runs first in the same transaction
        (the saga runner's lease check)."""
        async with self._database.transaction() as transaction:
            if fence is not None:
                await fence(transaction)
            return await self._append(transaction, order_id, version, events)

    async def load_in(self, transaction: SqlTransaction, order_id: str) -> tuple[OrderState, int]:
        """`load`, inside an open transaction (a consumer's, whose inbox row commits with what
        it appends); KeyError if unknown."""
        recorded = await self.events.read(transaction, order_id)
        if not recorded:
            raise KeyError(order_id)
        return fold((r.event, r.recorded_at) for r in recorded), recorded[-1].version

    async def append(
        self, transaction: SqlTransaction, order_id: str, version: int, events: Sequence[Message]
    ) -> tuple[OrderState, int]:
        """`record`, inside an open transaction."""
        return await self._append(transaction, order_id, version, events)

    async def get(self, order_id: str) -> tuple[orders_pb2.Order, int] | None:
        """The order's view and its version, or None."""
        row = await self._database.fetch_one(
            "SELECT data, version FROM order_views WHERE order_id = ?", (order_id,)
        )
        if row is None:
            return None
        return orders_pb2.Order.FromString(row["data"]), int(row["version"])

    async def unfinished(self) -> list[str]:
        """Orders whose saga has not ended, oldest first."""
        rows = await self._database.fetch_all(
            "SELECT v.order_id FROM order_views v JOIN events e"
            " ON e.stream_id = v.order_id AND e.version = 1"
            " WHERE v.saga_ended = 0 ORDER BY e.position"
        )
        return [str(row["order_id"]) for row in rows]

    async def _append(
        self,
        transaction: SqlTransaction,
        order_id: str,
        version: int,
        events: Sequence[Message],
    ) -> tuple[OrderState, int]:
        recorded = await self.events.extend(transaction, order_id, version, events)
        new_version = recorded[-1].version
        state = fold((r.event, r.recorded_at) for r in recorded)
        await transaction.execute(
            "INSERT INTO order_views (order_id, customer_id, status, version, saga_ended, data)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (order_id) DO UPDATE SET"
            " status = excluded.status, version = excluded.version,"
            " saga_ended = excluded.saga_ended, data = excluded.data",
            (
                order_id,
                state.placed.customer_id,
                state.status.value,
                new_version,
                int(state.progress.ended),
                order_message(state).SerializeToString(),
            ),
        )
        return state, new_version

    async def _order_for_key(
        self, transaction: Queries, key: IdempotencyKey | None
    ) -> OrderState | None:
        earlier = await self.placing.recall(transaction, key, orders_pb2.GetOrderRequest)
        if earlier is None:
            return None
        recorded = await self.events.read(transaction, earlier.order_id)
        return fold((r.event, r.recorded_at) for r in recorded)
