"""Orders and their idempotency keys, kept in SQLite and shared by every orders instance.

An order, its lines and its idempotency key are written in one transaction, so a reader sees
all of an order or none of it. The key check and the insert share a BEGIN IMMEDIATE
transaction: of two concurrent requests with one key (two tasks, or two processes on one
file), the second waits for the first to commit, then finds the key and returns the first's
order. The key is stored with a fingerprint of what the client asked for (customer and
requested lines, not the prices the catalog charged), so a retry matches its original even
after a price change, and a reused key with another request is told apart from a retry.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Self

from meshkit.storage.sqlite import DatabaseStore, SqliteDatabase, SqlTransaction

INT64_MAX = 2**63 - 1


class OrderStatus(StrEnum):
    """Where an order is in its life; the names of foodmesh.orders.v1.OrderStatus without the
    ORDER_STATUS_ prefix."""

    PLACED = "PLACED"
    CONFIRMED = "CONFIRMED"
    PREPARING = "PREPARING"
    OUT_FOR_DELIVERY = "OUT_FOR_DELIVERY"
    DELIVERED = "DELIVERED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class OrderLine:
    """An item and how many of it, at a unit price in the minor unit of the currency."""

    item_id: str
    quantity: int
    unit_price_cents: int


@dataclass(frozen=True, slots=True)
class NewOrder:
    """An order to store: lines priced by the catalog, all from one restaurant and currency."""

    customer_id: str
    restaurant_id: str
    currency: str
    lines: tuple[OrderLine, ...]


@dataclass(frozen=True, slots=True)
class StoredOrder:
    """An order as stored, with the id and time the store gave it."""

    order_id: str
    customer_id: str
    restaurant_id: str
    currency: str
    lines: tuple[OrderLine, ...]
    total_cents: int
    status: OrderStatus
    create_time: datetime


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    """The result of place(): the order, and whether this call created it (False: a retry)."""

    order: StoredOrder
    created: bool


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A caller's idempotency key with the fingerprint of the request it came with."""

    key: str
    request_fingerprint: str

    @classmethod
    def for_request(
        cls, key: str, customer_id: str, requested_lines: Sequence[OrderLine]
    ) -> IdempotencyKey:
        """Fingerprint the request as the client sent it (requested prices, 0 included)."""
        canonical = json.dumps(
            [
                customer_id,
                [[ln.item_id, ln.quantity, ln.unit_price_cents] for ln in requested_lines],
            ],
            separators=(",", ":"),
        )
        return cls(key, hashlib.sha256(canonical.encode()).hexdigest())


class IdempotencyConflict(Exception):
    """The idempotency key was already used with a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency_key {key!r} was already used with a different request")
        self.key = key


class OrderTotalOutOfRange(ValueError):
    """The order's total does not fit a signed 64-bit integer (the wire and SQLite type)."""


def order_total_cents(lines: Sequence[OrderLine]) -> int:
    """The sum of quantity * unit_price_cents; OrderTotalOutOfRange when it exceeds int64."""
    total = sum(line.quantity * line.unit_price_cents for line in lines)
    if total > INT64_MAX:
        raise OrderTotalOutOfRange(
            f"the order total of {total} cents exceeds the largest total, {INT64_MAX}"
        )
    return total


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        restaurant_id TEXT NOT NULL,
        currency TEXT NOT NULL,
        total_cents INTEGER NOT NULL CHECK (total_cents >= 0),
        status TEXT NOT NULL,
        create_time TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS order_lines (
        order_id TEXT NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
        line_number INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        quantity INTEGER NOT NULL CHECK (quantity > 0),
        unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
        PRIMARY KEY (order_id, line_number)
    )""",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        idempotency_key TEXT PRIMARY KEY,
        request_fingerprint TEXT NOT NULL,
        order_id TEXT NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_by_order ON idempotency_keys (order_id)",
)


class OrdersStore(DatabaseStore):
    """Stores orders atomically and deduplicates them by idempotency key."""

    @classmethod
    async def open(cls, path: Path | str) -> Self:
        """Open (or create) the orders file at path."""
        return cls(await SqliteDatabase.open(path, schema=SCHEMA))

    async def find_by_idempotency_key(self, idempotency: IdempotencyKey) -> StoredOrder | None:
        """The order an earlier request with this key and fingerprint created, or None if the
        key is unused; IdempotencyConflict if it was used with another request."""
        async with self._database.snapshot() as transaction:
            return await _order_for_key(transaction, idempotency)

    async def place(
        self, order: NewOrder, idempotency: IdempotencyKey | None = None
    ) -> PlacedOrder:
        """Store the order with a new id, its lines and its key in one transaction.

        With a key already used by the same request, store nothing and return that order;
        with a key used by another request, raise IdempotencyConflict. Raises
        OrderTotalOutOfRange (storing nothing) when the total does not fit int64.
        """
        total_cents = order_total_cents(order.lines)
        async with self._database.transaction() as transaction:
            if idempotency is not None:
                existing = await _order_for_key(transaction, idempotency)
                if existing is not None:
                    return PlacedOrder(existing, created=False)
            stored = StoredOrder(
                order_id=str(uuid.uuid4()),
                customer_id=order.customer_id,
                restaurant_id=order.restaurant_id,
                currency=order.currency,
                lines=order.lines,
                total_cents=total_cents,
                status=OrderStatus.PLACED,
                create_time=datetime.now(UTC),
            )
            await _insert_order(transaction, stored)
            if idempotency is not None:
                await transaction.execute(
                    "INSERT INTO idempotency_keys (idempotency_key, request_fingerprint, order_id)"
                    " VALUES (?, ?, ?)",
                    (idempotency.key, idempotency.request_fingerprint, stored.order_id),
                )
        return PlacedOrder(stored, created=True)

    async def get(self, order_id: str) -> StoredOrder | None:
        """The order with this id, or None."""
        async with self._database.snapshot() as transaction:
            return await _load_order(transaction, order_id)


async def _order_for_key(
    transaction: SqlTransaction, idempotency: IdempotencyKey
) -> StoredOrder | None:
    row = await transaction.fetch_one(
        "SELECT request_fingerprint, order_id FROM idempotency_keys WHERE idempotency_key = ?",
        (idempotency.key,),
    )
    if row is None:
        return None
    if row["request_fingerprint"] != idempotency.request_fingerprint:
        raise IdempotencyConflict(idempotency.key)
    return await _load_order(transaction, row["order_id"])


async def _insert_order(transaction: SqlTransaction, order: StoredOrder) -> None:
    await transaction.execute(
        "INSERT INTO orders (order_id, customer_id, restaurant_id, currency, total_cents,"
        " status, create_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            order.order_id,
            order.customer_id,
            order.restaurant_id,
            order.currency,
            order.total_cents,
            order.status.value,
            order.create_time.isoformat(timespec="microseconds"),
        ),
    )
    await transaction.execute_many(
        "INSERT INTO order_lines (order_id, line_number, item_id, quantity, unit_price_cents)"
        " VALUES (?, ?, ?, ?, ?)",
        [
            (order.order_id, number, line.item_id, line.quantity, line.unit_price_cents)
            for number, line in enumerate(order.lines)
        ],
    )


async def _load_order(transaction: SqlTransaction, order_id: str) -> StoredOrder | None:
    row = await transaction.fetch_one("SELECT * FROM orders WHERE order_id = ?", (order_id,))
    if row is None:
        return None
    line_rows = await transaction.fetch_all(
        "SELECT item_id, quantity, unit_price_cents FROM order_lines WHERE order_id = ?"
        " ORDER BY line_number",
        (order_id,),
    )
    return _order_from_rows(row, line_rows)


def _order_from_rows(row: sqlite3.Row, line_rows: Sequence[sqlite3.Row]) -> StoredOrder:
    return StoredOrder(
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        restaurant_id=row["restaurant_id"],
        currency=row["currency"],
        lines=tuple(
            OrderLine(r["item_id"], r["quantity"], r["unit_price_cents"]) for r in line_rows
        ),
        total_cents=row["total_cents"],
        status=OrderStatus(row["status"]),
        create_time=datetime.fromisoformat(row["create_time"]),
    )
