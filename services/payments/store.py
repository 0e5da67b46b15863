"""Payments, their history and the idempotency ledger, kept in the service's database (a
SQLite file, or Postgres) and shared by every payments instance.

Each mutating call is one write transaction holding the database's write lock
(meshkit.storage.database): the ledger lookup, the check of the payment's state, the change,
its `payment_events` row and the ledger record. Two concurrent duplicates, in one process or
in two sharing the database, can therefore never both find the key unused, and two different
captures of one payment can never both find it AUTHORIZED: the second waits for the first to
commit, then sees its effect. A refusal raised inside the
transaction (NOT_FOUND, FAILED_PRECONDITION) rolls it back, so it changes nothing and leaves
no ledger record: its retry is judged again.

The ledger remembers the response message, so the store builds the wire form of a payment
(payment_message) itself: a repeated key gets back the bytes the first call got, the payment as
that call left it, whatever happened to it since. Payments are listed in the order they were
created by an integer sequence, not by time, which two instances may share to the microsecond.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Self

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.payments.v1 import payments_pb2
from meshkit.storage import idempotency
from meshkit.storage.database import Database, DatabaseStore, Row, SqlTransaction, open_database
from meshkit.storage.idempotency import IdempotencyKey, IdempotencyLedger
from meshkit.storage.schema import BigInt, Schema
from services.refusals import failed_precondition, not_found

SERVICE = "foodmesh.payments.v1.PaymentService"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class PaymentStatus(StrEnum):
    """Where a payment is in its life; the names of foodmesh.payments.v1.PaymentStatus
    without the PAYMENT_STATUS_ prefix."""

    AUTHORIZED = "AUTHORIZED"
    DECLINED = "DECLINED"
    CAPTURED = "CAPTURED"
    VOIDED = "VOIDED"
    REFUNDED = "REFUNDED"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of an existing payment: the one status it starts from, the one it leads to,
    and the ledger of the RPC that asks for it."""

    verb: str
    source: PaymentStatus
    target: PaymentStatus
    ledger: IdempotencyLedger


AUTHORIZE = IdempotencyLedger(f"{SERVICE}/AuthorizePayment")
CAPTURE = Transition(
    "capture",
    PaymentStatus.AUTHORIZED,
    PaymentStatus.CAPTURED,
    IdempotencyLedger(f"{SERVICE}/CapturePayment"),
)
VOID = Transition(
    "void",
    PaymentStatus.AUTHORIZED,
    PaymentStatus.VOIDED,
    IdempotencyLedger(f"{SERVICE}/VoidPayment"),
)
REFUND = Transition(
    "refund",
    PaymentStatus.CAPTURED,
    PaymentStatus.REFUNDED,
    IdempotencyLedger(f"{SERVICE}/RefundPayment"),
)


@dataclass(frozen=True, slots=True)
class NewPayment:
    """The provider's answer to an authorization, to store: AUTHORIZED, or DECLINED with a
    decline_reason."""

    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    payment_method: str
    status: PaymentStatus
    decline_reason: str = ""


@dataclass(frozen=True, slots=True)
class StoredPayment:
    """A payment as stored, with the id and times the store gave it."""

    payment_id: str
    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    payment_method: str
    status: PaymentStatus
    decline_reason: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True, slots=True)
class StateChange:
    """A change one call made: from_status None means the call created the payment."""

    payment: StoredPayment
    from_status: PaymentStatus | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a mutating call answers, and what it changed: change is None when a repeated
    idempotency key was answered from the ledger and nothing changed."""

    response: payments_pb2.Payment
    change: StateChange | None


_METADATA = sa.MetaData()
_PAYMENT_STATUSES = "'AUTHORIZED', 'DECLINED', 'CAPTURED', 'VOIDED', 'REFUNDED'"
SCHEMA = (
    Schema.of(
        "payments",
        sa.Table(
            "payments",
            _METADATA,
            sa.Column("sequence", BigInt, primary_key=True),
            sa.Column("payment_id", sa.Text, nullable=False, unique=True),
            sa.Column("order_id", sa.Text, nullable=False),
            sa.Column("customer_id", sa.Text, nullable=False),
            sa.Column(
                "amount_cents", BigInt, sa.CheckConstraint("amount_cents > 0"), nullable=False
            ),
            sa.Column("currency", sa.Text, nullable=False),
            sa.Column("payment_method", sa.Text, nullable=False),
            sa.Column(
                "status",
                sa.Text,
                sa.CheckConstraint(f"status IN ({_PAYMENT_STATUSES})"),
                nullable=False,
            ),
            sa.Column("decline_reason", sa.Text, nullable=False, server_default=""),
            sa.Column("create_time", sa.Text, nullable=False),
            sa.Column("update_time", sa.Text, nullable=False),
            sa.Index("payments_by_order", "order_id", "sequence"),
        ),
        # One row per status change; from_status is NULL for the authorization that made it.
        sa.Table(
            "payment_events",
            _METADATA,
            sa.Column("event_id", BigInt, primary_key=True),
            sa.Column("payment_id", sa.Text, sa.ForeignKey("payments.payment_id"), nullable=False),
            sa.Column("from_status", sa.Text),
            sa.Column("to_status", sa.Text, nullable=False),
            sa.Column("time", sa.Text, nullable=False),
            sa.Index("payment_events_by_payment", "payment_id"),
        ),
    ),
    idempotency.SCHEMA,
)

_COLUMNS = (
    "payment_id, order_id, customer_id, amount_cents, currency, payment_method, status,"
    " decline_reason, create_time, update_time"
)


class PaymentsStore(DatabaseStore):
    """Creates payments and moves them on, each change with its event and ledger record in
    one transaction."""

    def __init__(self, database: Database, clock: Clock = utc_now) -> None:
        super().__init__(database)
        self._clock = clock

    @classmethod
    async def open(cls, location: Path | str, *, clock: Clock = utc_now) -> Self:
        """Open (or create) the payments database at `location` (a SQLite file's path or a
        `postgresql://` URL); clock gives the times stored."""
        return cls(await open_database(location, schema=SCHEMA), clock)

    async def authorize(self, new: NewPayment, key: IdempotencyKey | None) -> Outcome:
        """Store the provider's answer as a new payment with its first event, or, for a used
        key with the same request, return the first response (IdempotencyConflict for a used
        key with another request)."""
        if new.status not in (PaymentStatus.AUTHORIZED, PaymentStatus.DECLINED):
            raise ValueError(f"a new payment is AUTHORIZED or DECLINED, not {new.status}")
        async with self._database.transaction() as transaction:
            earlier = await AUTHORIZE.recall(transaction, key, payments_pb2.Payment)
            if earlier is not None:
                return Outcome(earlier, change=None)
            now = self._clock()
            payment = StoredPayment(
                payment_id=f"p-{uuid.uuid4()}",
                order_id=new.order_id,
                customer_id=new.customer_id,
                amount_cents=new.amount_cents,
                currency=new.currency,
                payment_method=new.payment_method,
                status=new.status,
                decline_reason=new.decline_reason,
                create_time=now,
                update_time=now,
            )
            await _insert_payment(transaction, payment)
            await _record_event(transaction, payment, None)
            response = payment_message(payment)
            await AUTHORIZE.remember(transaction, key, response)
        return Outcome(response, StateChange(payment, from_status=None))

    async def move(
        self, payment_id: str, transition: Transition, key: IdempotencyKey | None
    ) -> Outcome:
        """Move the payment from transition.source to transition.target with its event, or,
        for a used key with the same request, return the first response.

        Refuses (changing nothing) with NOT_FOUND for an unknown payment_id and with
        FAILED_PRECONDITION naming both states when the payment is not in transition.source;
        IdempotencyConflict for a used key with another request.
        """
        async with self._database.transaction() as transaction:
            earlier = await transition.ledger.recall(transaction, key, payments_pb2.Payment)
            if earlier is not None:
                return Outcome(earlier, change=None)
            current = await _load_payment(transaction, payment_id)
            if current is None:
                raise not_found(f"payment_id {payment_id!r}: no such payment")
            if current.status != transition.source:
                raise failed_precondition(
                    f"payment_id {payment_id!r} is {current.status}; "
                    f"{transition.verb} needs {transition.source}"
                )
            moved = dataclasses.replace(
                current, status=transition.target, update_time=self._clock()
            )
            await transaction.execute(
                "UPDATE payments SET status = ?, update_time = ? WHERE payment_id = ?",
                (moved.status.value, _time_text(moved.update_time), payment_id),
            )
            await _record_event(transaction, moved, current.status)
            response = payment_message(moved)
            await transition.ledger.remember(transaction, key, response)
        return Outcome(response, StateChange(moved, from_status=current.status))

    async def get(self, payment_id: str) -> StoredPayment | None:
        """The payment with this id, in its current state, or None."""
        async with self._database.snapshot() as transaction:
            return await _load_payment(transaction, payment_id)

    async def list_for_order(self, order_id: str) -> tuple[StoredPayment, ...]:
        """Every payment of the order, in the order they were created."""
        rows = await self._database.fetch_all(
            f"SELECT {_COLUMNS} FROM payments WHERE order_id = ? ORDER BY sequence", (order_id,)
        )
        return tuple(_payment_from_row(row) for row in rows)


def payment_message(payment: StoredPayment) -> payments_pb2.Payment:
    """The wire form of a stored payment."""
    create_time, update_time = Timestamp(), Timestamp()
    create_time.FromDatetime(payment.create_time)
    update_time.FromDatetime(payment.update_time)
    return payments_pb2.Payment(
        payment_id=payment.payment_id,
        order_id=payment.order_id,
        status=payments_pb2.PaymentStatus.Value(f"PAYMENT_STATUS_{payment.status.value}"),
        amount_cents=payment.amount_cents,
        currency=payment.currency,
        decline_reason=payment.decline_reason,
        customer_id=payment.customer_id,
        payment_method=payment.payment_method,
        create_time=create_time,
        update_time=update_time,
    )


async def _insert_payment(transaction: SqlTransaction, payment: StoredPayment) -> None:
    await transaction.execute(
        f"INSERT INTO payments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            payment.payment_id,
            payment.order_id,
            payment.customer_id,
            payment.amount_cents,
            payment.currency,
            payment.payment_method,
            payment.status.value,
            payment.decline_reason,
            _time_text(payment.create_time),
            _time_text(payment.update_time),
        ),
    )


async def _record_event(
    transaction: SqlTransaction, payment: StoredPayment, from_status: PaymentStatus | None
) -> None:
    await transaction.execute(
        "INSERT INTO payment_events (payment_id, from_status, to_status, time) VALUES (?, ?, ?, ?)",
        (
            payment.payment_id,
            None if from_status is None else from_status.value,
            payment.status.value,
            _time_text(payment.update_time),
        ),
    )


async def _load_payment(transaction: SqlTransaction, payment_id: str) -> StoredPayment | None:
    row = await transaction.fetch_one(
        f"SELECT {_COLUMNS} FROM payments WHERE payment_id = ?", (payment_id,)
    )
    return None if row is None else _payment_from_row(row)


def _time_text(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _payment_from_row(row: Row) -> StoredPayment:
    return StoredPayment(
        payment_id=row["payment_id"],
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        amount_cents=row["amount_cents"],
        currency=row["currency"],
        payment_method=row["payment_method"],
        status=PaymentStatus(row["status"]),
        decline_reason=row["decline_reason"],
        create_time=datetime.fromisoformat(row["create_time"]),
        update_time=datetime.fromisoformat(row["update_time"]),
    )
