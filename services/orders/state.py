"""An order's state as the fold of its event stream, and the checkout saga's progress in it.

The stream is the truth; this module is the only place that says what each event means.
`OrderState` is immutable: `apply` returns a new one, so a state read by one coroutine is
never changed under it by another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.orders.v1 import events_pb2, orders_pb2
from meshkit.saga import Progress

EVENT_TYPES: tuple[type[Message], ...] = (
    events_pb2.OrderPlaced,
    events_pb2.PaymentAuthorized,
    events_pb2.PaymentDeclined,
    events_pb2.DeliveryScheduled,
    events_pb2.PaymentCaptured,
    events_pb2.OrderConfirmed,
    events_pb2.CheckoutFailed,
    events_pb2.CancellationRequested,
    events_pb2.StepCompensated,
    events_pb2.OrderRejected,
    events_pb2.OrderCancelled,
    events_pb2.OrderPickedUp,
    events_pb2.OrderDelivered,
)
"""Every event an order's stream may hold."""

AUTHORIZE, SCHEDULE, CAPTURE = "authorize_payment", "schedule_delivery", "capture_payment"
CANCELLED_BY_CUSTOMER = "cancelled by the customer"


class OrderStatus(StrEnum):
    """foodmesh.orders.v1.OrderStatus without the ORDER_STATUS_ prefix."""

    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    OUT_FOR_DELIVERY = "OUT_FOR_DELIVERY"
    DELIVERED = "DELIVERED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"


FINAL = frozenset({OrderStatus.DELIVERED, OrderStatus.REJECTED, OrderStatus.CANCELLED})
SETTLED = FINAL | {OrderStatus.CONFIRMED, OrderStatus.OUT_FOR_DELIVERY}
"""Where PlaceOrder stops waiting: the checkout has an answer."""


@dataclass(frozen=True, slots=True)
class OrderState:
    """An order as its events have made it."""

    placed: events_pb2.OrderPlaced
    status: OrderStatus = OrderStatus.PENDING
    payment_id: str = ""
    delivery_id: str = ""
    rejection_reason: str = ""
    progress: Progress = field(default_factory=Progress)
    update_time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def order_id(self) -> str:
        return self.placed.order_id

    @property
    def final(self) -> bool:
        return self.status in FINAL


def fold(events: Iterable[tuple[Message, datetime]]) -> OrderState:
    """The state the events (oldest first, with their record times) make; the first must be
    OrderPlaced."""
    state: OrderState | None = None
    for event, recorded_at in events:
        if state is None:
            if not isinstance(event, events_pb2.OrderPlaced):
                raise ValueError(f"an order's stream starts with OrderPlaced, not {event}")
            state = OrderState(placed=event, update_time=recorded_at)
            continue
        state = replace(apply(state, event), update_time=recorded_at)
    if state is None:
        raise ValueError("an order's stream is empty")
    return state


def apply(state: OrderState, event: Message) -> OrderState:
    """The state after one more event."""
    p = state.progress
    match event:
        case events_pb2.PaymentAuthorized():
            return replace(
                state, payment_id=event.payment_id, progress=replace(p, done=p.done | {AUTHORIZE})
            )
        case events_pb2.PaymentDeclined():
            # Declined: nothing was authorized, nothing to undo (no failed step).
            return replace(
                state,
                payment_id=event.payment_id,
                rejection_reason=f"payment declined: {event.decline_reason}",
                progress=replace(p, failure=f"payment declined: {event.decline_reason}"),
            )
        case events_pb2.DeliveryScheduled():
            return replace(
                state, delivery_id=event.delivery_id, progress=replace(p, done=p.done | {SCHEDULE})
            )
        case events_pb2.PaymentCaptured():
            return replace(state, progress=replace(p, done=p.done | {CAPTURE}))
        case events_pb2.OrderConfirmed():
            return replace(state, status=OrderStatus.CONFIRMED, progress=replace(p, ended=True))
        case events_pb2.CheckoutFailed():
            if p.failure is not None:  # cancelled meanwhile: the customer's reason stands
                return replace(state, progress=replace(p, failed_step=event.step))
            return replace(
                state,
                rejection_reason=event.reason,
                progress=replace(p, failure=event.reason, failed_step=event.step),
            )
        case events_pb2.CancellationRequested():
            return replace(
                state,
                rejection_reason=CANCELLED_BY_CUSTOMER,
                progress=replace(p, failure=CANCELLED_BY_CUSTOMER, ended=False),
            )
        case events_pb2.StepCompensated():
            return replace(state, progress=replace(p, compensated=p.compensated | {event.step}))
        case events_pb2.OrderRejected():
            return replace(state, status=OrderStatus.REJECTED, progress=replace(p, ended=True))
        case events_pb2.OrderCancelled():
            return replace(state, status=OrderStatus.CANCELLED, progress=replace(p, ended=True))
        case events_pb2.OrderPickedUp():
            return replace(state, status=OrderStatus.OUT_FOR_DELIVERY)
        case events_pb2.OrderDelivered():
            return replace(state, status=OrderStatus.DELIVERED)
    raise TypeError(f"not an order event: {type(event).__name__}")


def order_message(state: OrderState) -> orders_pb2.Order:
    """The wire form of an order's state."""
    placed = state.placed
    update_time = Timestamp()
    update_time.FromDatetime(state.update_time)
    return orders_pb2.Order(
        order_id=placed.order_id,
        customer_id=placed.customer_id,
        restaurant_id=placed.restaurant_id,
        lines=placed.lines,
        total_cents=placed.total_cents,
        currency=placed.currency,
        status=orders_pb2.OrderStatus.Value(f"ORDER_STATUS_{state.status.value}"),
        create_time=placed.create_time,
        rejection_reason=state.rejection_reason,
        payment_id=state.payment_id,
        delivery_id=state.delivery_id,
        payment_method=placed.payment_method,
        delivery_address=placed.delivery_address,
        update_time=update_time,
    )
