"""Deliveries, their history and the idempotency ledger, kept in the service's database (a
SQLite file or Postgres) and shared by every delivery instance.

Each mutating call is one write transaction, holding the database's write lock (SQLite's
BEGIN IMMEDIATE, Postgres's advisory lock: meshkit.storage.database): the ledger lookup, the
due trip steps (trips.py), the check of the courier pool or of the delivery's state, the change,
its `delivery_events` row and the ledger record. Choosing a courier is therefore race-safe
across instances: the second of two concurrent schedules waits for the first to commit and
then sees its courier busy. A partial unique index (one delivery ASSIGNED or PICKED_UP per
courier) makes the database itself refuse a double booking, whatever a future bug might try.

The pool is not stored: a courier is busy while a delivery ASSIGNED or PICKED_UP names it,
and `--couriers N` says which ids exist. A trip's steps are applied by conditional UPDATEs
(`WHERE status = 'ASSIGNED' AND pickup_time <= now`) that write the planned time as the
update time, so they are idempotent and any instance may apply them, in any number. A read
applies them only when what it read is due, so reads do not take the write lock every time.

Every status change also appends its domain event (foodmesh.delivery.v1 events.proto) to the
outbox in the same transaction (meshkit.events.store, the `events` table), which the relay
of one instance publishes to JetStream (stream DELIVERY).

`delivery_events` holds one row per status change (from_status NULL for the schedule): the
history TrackDelivery streams, so a watcher sees every step once, in order, even when two
steps were applied between two of its looks. A delivery's other fields never change after it
is scheduled, so the delivery as of an event is its row with that event's status and time.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.delivery.v1 import delivery_pb2, events_pb2
from meshkit.events import EventStore, relay
from meshkit.events import store as event_store
from meshkit.storage import idempotency, lease
from meshkit.storage.database import Database, DatabaseStore, Row, SqlTransaction, open_database
from meshkit.storage.idempotency import IdempotencyKey, IdempotencyLedger
from meshkit.storage.schema import BigInt, Schema, partial_index
from services.delivery.trips import (
    ON_TRIP,
    Clock,
    DeliveryStatus,
    Fleet,
    Trip,
    is_due,
    utc_now,
)
from services.refusals import failed_precondition, not_found

SERVICE = "foodmesh.delivery.v1.DeliveryService"
SCHEDULE = IdempotencyLedger(f"{SERVICE}/ScheduleDelivery")
CANCEL = IdempotencyLedger(f"{SERVICE}/CancelDelivery")
NO_COURIER = "no courier available"
DEFAULT_FLEET = Fleet()
EVENT_TYPES = (
    events_pb2.CourierAssigned,
    events_pb2.PickedUp,
    events_pb2.Delivered,
    events_pb2.DeliveryCancelled,
)
OUTBOX = EventStore(EVENT_TYPES)
"""Each delivery's events, a stream per delivery: the outbox the relay publishes (DELIVERY)."""

_METADATA = sa.MetaData()
_DELIVERY_STATUSES = "'ASSIGNED', 'PICKED_UP', 'DELIVERED', 'CANCELLED'"
SCHEMA = (
    Schema.of(
        "delivery",
        sa.Table(
            "deliveries",
            _METADATA,
            sa.Column("sequence", BigInt, primary_key=True),
            sa.Column("delivery_id", sa.Text, nullable=False, unique=True),
            sa.Column("order_id", sa.Text, nullable=False),
            sa.Column("restaurant_id", sa.Text, nullable=False),
            sa.Column("address", sa.Text, nullable=False),
            sa.Column("courier_id", sa.Text, nullable=False),
            sa.Column(
                "status",
                sa.Text,
                sa.CheckConstraint(f"status IN ({_DELIVERY_STATUSES})"),
                nullable=False,
            ),
            sa.Column("pickup_time", sa.Text, nullable=False),
            sa.Column("eta_time", sa.Text, nullable=False),
            sa.Column("create_time", sa.Text, nullable=False),
            sa.Column("update_time", sa.Text, nullable=False),
            sa.Index("deliveries_by_order", "order_id", "sequence"),
            sa.Index("deliveries_due_pickup", "status", "pickup_time"),
            sa.Index("deliveries_due_arrival", "status", "eta_time"),
            # A courier carries one delivery at a time.
            sa.Index(
                "deliveries_one_trip_per_courier",
                "courier_id",
                unique=True,
                **partial_index("status IN ('ASSIGNED', 'PICKED_UP')"),
            ),
        ),
        sa.Table(
            "delivery_events",
            _METADATA,
            sa.Column("event_id", BigInt, primary_key=True),
            sa.Column(
                "delivery_id", sa.Text, sa.ForeignKey("deliveries.delivery_id"), nullable=False
            ),
            sa.Column("from_status", sa.Text),
            sa.Column("to_status", sa.Text, nullable=False),
            sa.Column("time", sa.Text, nullable=False),
            sa.Index("delivery_events_by_delivery", "delivery_id", "event_id"),
        ),
    ),
    idempotency.SCHEMA,
    event_store.SCHEMA,
    lease.SCHEMA,
    relay.SCHEMA,
)

_COLUMNS = (
    "delivery_id, order_id, restaurant_id, address, courier_id, status, pickup_time,"
    " eta_time, create_time, update_time"
)

# The trip steps, in the order they are applied: (from, to, the column of the planned time).
_STEPS = (
    (DeliveryStatus.ASSIGNED, DeliveryStatus.PICKED_UP, "pickup_time"),
    (DeliveryStatus.PICKED_UP, DeliveryStatus.DELIVERED, "eta_time"),
)


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """What a ScheduleDelivery request asks to carry, and where."""

    order_id: str
    restaurant_id: str
    address: str


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """A delivery as stored, with the id, courier, trip and times the store gave it."""

    delivery_id: str
    order_id: str
    restaurant_id: str
    address: str
    courier_id: str
    status: DeliveryStatus
    trip: Trip
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True, slots=True)
class StateChange:
    """A change one call made: from_status None means the call scheduled the delivery."""

    delivery: StoredDelivery
    from_status: DeliveryStatus | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a mutating call answers, and what it changed: change is None when nothing
    changed (a repeated idempotency key, or a cancel of a cancelled delivery)."""

    response: delivery_pb2.Delivery
    change: StateChange | None


@dataclass(frozen=True, slots=True)
class Tracked:
    """A delivery now, its changes after the event a tracker last saw (each as the delivery
    was right after it, oldest first), and the id of the latest event."""

    current: StoredDelivery
    changes: tuple[StoredDelivery, ...]
    last_event: int


class DeliveriesStore(DatabaseStore):
    """Schedules deliveries on the fleet's free couriers, cancels them, applies their trips'
    due steps and reads them back."""

    def __init__(
        self, database: Database, fleet: Fleet = DEFAULT_FLEET, clock: Clock = utc_now
    ) -> None:
        super().__init__(database)
        self.fleet = fleet
        self.now = clock

    @classmethod
    async def open(
        cls, location: Path | str, *, fleet: Fleet = DEFAULT_FLEET, clock: Clock = utc_now
    ) -> Self:
        """Open (or create) the delivery database at `location` (a SQLite file's path or a
        `postgresql://` URL); fleet is this instance's courier pool and trip time, clock
        gives the times stored and says which steps are due."""
        return cls(await open_database(location, schema=SCHEMA), fleet, clock)

    async def schedule(self, new: NewDelivery, key: IdempotencyKey | None) -> Outcome:
        """Assign the first free courier and plan the trip, or, for a used key with the same
        request, return the first response. FAILED_PRECONDITION `no courier available` (and
        nothing stored) when every courier is on a trip; IdempotencyConflict for a used key
        with another request."""
        async with self._database.transaction() as transaction:
            earlier = await SCHEDULE.recall(transaction, key, delivery_pb2.Delivery)
            if earlier is not None:
                return Outcome(earlier, change=None)
            now = self.now()
            await _advance(transaction, now)
            courier_id = await self._free_courier(transaction)
            delivery = StoredDelivery(
                delivery_id=f"d-{uuid.uuid4()}",
                order_id=new.order_id,
                restaurant_id=new.restaurant_id,
                address=new.address,
                courier_id=courier_id,
                status=DeliveryStatus.ASSIGNED,
                trip=self.fleet.plan(now),
                create_time=now,
                update_time=now,
            )
            await _insert_delivery(transaction, delivery)
            await _record_event(transaction, delivery, None)
            response = delivery_message(delivery)
            await SCHEDULE.remember(transaction, key, response)
        return Outcome(response, StateChange(delivery, from_status=None))

    async def cancel(self, delivery_id: str, key: IdempotencyKey | None) -> Outcome:
        """ASSIGNED -> CANCELLED, freeing the courier; a CANCELLED delivery is returned as it
        is. NOT_FOUND for an unknown id, FAILED_PRECONDITION naming the state once the food
        is picked up (nothing changes); a used key with the same request returns the first
        response, with another request IdempotencyConflict."""
        async with self._database.transaction() as transaction:
            earlier = await CANCEL.recall(transaction, key, delivery_pb2.Delivery)
            if earlier is not None:
                return Outcome(earlier, change=None)
            now = self.now()
            await _advance(transaction, now)
            current = await _load(transaction, delivery_id)
            if current is None:
                raise not_found(f"delivery_id {delivery_id!r}: no such delivery")
            change = None
            if current.status is DeliveryStatus.CANCELLED:
                cancelled = current
            elif current.status is DeliveryStatus.ASSIGNED:
                cancelled = dataclasses.replace(
                    current, status=DeliveryStatus.CANCELLED, update_time=now
                )
                await transaction.execute(
                    "UPDATE deliveries SET status = ?, update_time = ?"
                    " WHERE delivery_id = ? AND status = ?",
                    (cancelled.status.value, _time_text(now), delivery_id, current.status.value),
                )
                await _record_event(transaction, cancelled, current.status)
                change = StateChange(cancelled, from_status=current.status)
            else:
                raise failed_precondition(
                    f"delivery_id {delivery_id!r} is {current.status}: the food is picked up "
                    "already; only an ASSIGNED delivery can be cancelled"
                )
            response = delivery_message(cancelled)
            await CANCEL.remember(transaction, key, response)
        return Outcome(response, change)

    async def advance(self) -> int:
        """Apply every trip step that is due now; the number of steps applied."""
        async with self._database.transaction() as transaction:
            return await _advance(transaction, self.now())

    async def get(self, delivery_id: str) -> StoredDelivery | None:
        """The delivery with this id, in the state the clock says it is in, or None."""
        tracked = await self.track(delivery_id)
        return None if tracked is None else tracked.current

    async def list_for_order(self, order_id: str) -> tuple[StoredDelivery, ...]:
        """Every delivery of the order, in the order they were scheduled, each in the state
        the clock says it is in."""
        deliveries = await self._list_for_order(order_id)
        now = self.now()
        if any(is_due(d.status, d.trip, now) for d in deliveries):
            await self.advance()
            deliveries = await self._list_for_order(order_id)
        return deliveries

    async def track(self, delivery_id: str, after_event: int | None = None) -> Tracked | None:
        """The delivery in the state the clock says it is in, with its changes after event
        `after_event` (none when None), or None for an unknown id."""
        tracked = await self._tracked(delivery_id, after_event)
        if tracked is not None and is_due(tracked.current.status, tracked.current.trip, self.now()):
            await self.advance()
            tracked = await self._tracked(delivery_id, after_event)
        return tracked

    async def _free_courier(self, transaction: SqlTransaction) -> str:
        rows = await transaction.fetch_all(
            "SELECT courier_id FROM deliveries WHERE status IN (?, ?)",
            tuple(status.value for status in ON_TRIP),
        )
        busy = {row["courier_id"] for row in rows}
        for courier_id in self.fleet.courier_ids():
            if courier_id not in busy:
                return courier_id
        if not self.fleet.couriers:
            raise failed_precondition(f"{NO_COURIER}: the pool has no couriers")
        on_trip = "the only courier is" if self.fleet.couriers == 1 else "every courier is"
        raise failed_precondition(f"{NO_COURIER}: {on_trip} on a trip; try again later")

    async def _list_for_order(self, order_id: str) -> tuple[StoredDelivery, ...]:
        rows = await self._database.fetch_all(
            f"SELECT {_COLUMNS} FROM deliveries WHERE order_id = ? ORDER BY sequence",
            (order_id,),
        )
        return tuple(_delivery_from_row(row) for row in rows)

    async def _tracked(self, delivery_id: str, after_event: int | None) -> Tracked | None:
        async with self._database.snapshot() as transaction:
            current = await _load(transaction, delivery_id)
            if current is None:
                return None
            rows = await transaction.fetch_all(
                "SELECT event_id, to_status, time FROM delivery_events"
                " WHERE delivery_id = ? AND event_id > ? ORDER BY event_id",
                (delivery_id, -1 if after_event is None else after_event),
            )
        if not rows:
            return Tracked(current, (), -1 if after_event is None else after_event)
        changes = tuple(
            dataclasses.replace(
                current,
                status=DeliveryStatus(row["to_status"]),
                update_time=_time_of(row["time"]),
            )
            for row in rows
        )
        last_event = int(rows[-1]["event_id"])
        return Tracked(current, () if after_event is None else changes, last_event)


def delivery_message(delivery: StoredDelivery) -> delivery_pb2.Delivery:
    """The wire form of a stored delivery."""
    return delivery_pb2.Delivery(
        delivery_id=delivery.delivery_id,
        order_id=delivery.order_id,
        courier_id=delivery.courier_id,
        status=delivery_pb2.DeliveryStatus.Value(f"DELIVERY_STATUS_{delivery.status.value}"),
        eta_time=_timestamp(delivery.trip.eta_time),
        restaurant_id=delivery.restaurant_id,
        address=delivery.address,
        pickup_time=_timestamp(delivery.trip.pickup_time),
        create_time=_timestamp(delivery.create_time),
        update_time=_timestamp(delivery.update_time),
    )


async def _advance(transaction: SqlTransaction, now: datetime) -> int:
    """Apply the trip steps due at `now`, each with its history row and its event at its
    planned time; steps already applied match no row, so this is safe to run anywhere, any
    number of times."""
    applied = 0
    for source, target, planned in _STEPS:
        parameters: Sequence[str] = (source.value, _time_text(now))
        rows = await transaction.fetch_all(
            f"SELECT {_COLUMNS} FROM deliveries WHERE status = ? AND {planned} <= ?"
            f" ORDER BY {planned}, sequence",
            parameters,
        )
        if not rows:
            continue
        for row in rows:
            due = _delivery_from_row(row)
            moved = dataclasses.replace(due, status=target, update_time=getattr(due.trip, planned))
            await _record_event(transaction, moved, source)
        applied += await transaction.execute(
            f"UPDATE deliveries SET status = '{target.value}', update_time = {planned}"
            f" WHERE status = ? AND {planned} <= ?",
            parameters,
        )
    return applied


async def _insert_delivery(transaction: SqlTransaction, delivery: StoredDelivery) -> None:
    await transaction.execute(
        f"INSERT INTO deliveries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            delivery.delivery_id,
            delivery.order_id,
            delivery.restaurant_id,
            delivery.address,
            delivery.courier_id,
            delivery.status.value,
            _time_text(delivery.trip.pickup_time),
            _time_text(delivery.trip.eta_time),
            _time_text(delivery.create_time),
            _time_text(delivery.update_time),
        ),
    )


async def _record_event(
    transaction: SqlTransaction, delivery: StoredDelivery, from_status: DeliveryStatus | None
) -> None:
    """The change's history row, and its domain event in the outbox (meshkit.events)."""
    await transaction.execute(
        "INSERT INTO delivery_events (delivery_id, from_status, to_status, time)"
        " VALUES (?, ?, ?, ?)",
        (
            delivery.delivery_id,
            None if from_status is None else from_status.value,
            delivery.status.value,
            _time_text(delivery.update_time),
        ),
    )
    await OUTBOX.append_next(transaction, delivery.delivery_id, [domain_event(delivery)])


def domain_event(delivery: StoredDelivery) -> Message:
    """The foodmesh.delivery.v1 event of the delivery's latest change."""
    at = _timestamp(delivery.update_time)
    match delivery.status:
        case DeliveryStatus.ASSIGNED:
            return events_pb2.CourierAssigned(
                delivery_id=delivery.delivery_id,
                order_id=delivery.order_id,
                courier_id=delivery.courier_id,
                restaurant_id=delivery.restaurant_id,
                pickup_time=_timestamp(delivery.trip.pickup_time),
                eta_time=_timestamp(delivery.trip.eta_time),
            )
        case DeliveryStatus.PICKED_UP:
            return events_pb2.PickedUp(
                delivery_id=delivery.delivery_id,
                order_id=delivery.order_id,
                courier_id=delivery.courier_id,
                pickup_time=at,
            )
        case DeliveryStatus.DELIVERED:
            return events_pb2.Delivered(
                delivery_id=delivery.delivery_id,
                order_id=delivery.order_id,
                courier_id=delivery.courier_id,
                delivery_time=at,
            )
        case DeliveryStatus.CANCELLED:
            return events_pb2.DeliveryCancelled(
                delivery_id=delivery.delivery_id, order_id=delivery.order_id, cancel_time=at
            )


async def _load(transaction: SqlTransaction, delivery_id: str) -> StoredDelivery | None:
    row = await transaction.fetch_one(
        f"SELECT {_COLUMNS} FROM deliveries WHERE delivery_id = ?", (delivery_id,)
    )
    return None if row is None else _delivery_from_row(row)


def _time_text(moment: datetime) -> str:
    """A fixed-width UTC form, so that SQL compares times as text correctly."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _time_of(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _timestamp(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


def _delivery_from_row(row: Row) -> StoredDelivery:
    return StoredDelivery(
        delivery_id=row["delivery_id"],
        order_id=row["order_id"],
        restaurant_id=row["restaurant_id"],
        address=row["address"],
        courier_id=row["courier_id"],
        status=DeliveryStatus(row["status"]),
        trip=Trip(pickup_time=_time_of(row["pickup_time"]), eta_time=_time_of(row["eta_time"])),
        create_time=_time_of(row["create_time"]),
        update_time=_time_of(row["update_time"]),
    )
