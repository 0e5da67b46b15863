"""foodmesh.delivery.v1.DeliveryService on top of DeliveriesStore.

Everything the request alone can show wrong is refused before the store is touched, with a
message naming the field. The pool, the state rules and the idempotency ledger live in the
store's transaction (store.py); the servicer logs one line per change a call made.

TrackDelivery needs no notification channel between instances: a trip's next step is known
in advance (trips.py), so the stream sleeps until it is due, and at most `track_poll_s`
between two looks, to see a cancel made through another instance in time. Each look reads the
delivery's history after the last event sent, so every change is sent once, in order, even
when two steps fell between two looks. A look writes only when a step is due (the store
applies it); otherwise it is a read in a snapshot, which holds up no writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from meshkit.storage.idempotency import key_problem
from services.delivery.store import (
    CANCEL,
    SCHEDULE,
    DeliveriesStore,
    NewDelivery,
    Outcome,
    StoredDelivery,
    Tracked,
    delivery_message,
)
from services.delivery.trips import FINAL, next_due
from services.refusals import Refusal, invalid, not_found, refusing, status_of

MAX_TEXT_LENGTH = 500
TRACK_POLL_S = 0.25

ServicerContext = grpc.aio.ServicerContext[object, object]
_log = logging.getLogger(__name__)


class DeliveryServicer(delivery_pb2_grpc.DeliveryServiceServicer):
    """Schedules deliveries on the courier pool, cancels them, and follows their trips."""

    def __init__(self, store: DeliveriesStore, *, track_poll_s: float = TRACK_POLL_S) -> None:
        self._store = store
        self._track_poll_s = track_poll_s

    @refusing
    async def ScheduleDelivery(
        self, request: delivery_pb2.ScheduleDeliveryRequest, context: ServicerContext
    ) -> delivery_pb2.Delivery:
        new = check_schedule_request(request)
        return _logged(await self._store.schedule(new, SCHEDULE.key_of(request)))

    @refusing
    async def CancelDelivery(
        self, request: delivery_pb2.CancelDeliveryRequest, context: ServicerContext
    ) -> delivery_pb2.Delivery:
        _require(request.delivery_id, "delivery_id")
        _check_key(request.idempotency_key)
        return _logged(await self._store.cancel(request.delivery_id, CANCEL.key_of(request)))

    @refusing
    async def GetDelivery(
        self, request: delivery_pb2.GetDeliveryRequest, context: ServicerContext
    ) -> delivery_pb2.Delivery:
        return delivery_message((await self._tracked(request.delivery_id)).current)

    @refusing
    async def ListDeliveries(
        self, request: delivery_pb2.ListDeliveriesRequest, context: ServicerContext
    ) -> delivery_pb2.ListDeliveriesResponse:
        _require(request.order_id, "order_id")
        deliveries = await self._store.list_for_order(request.order_id)
        return delivery_pb2.ListDeliveriesResponse(
            deliveries=[delivery_message(delivery) for delivery in deliveries]
        )

    async def TrackDelivery(
        self, request: delivery_pb2.TrackDeliveryRequest, context: ServicerContext
    ) -> AsyncIterator[delivery_pb2.Delivery]:
        try:
            tracked = await self._tracked(request.delivery_id)
        except Refusal as refusal:
            status = status_of(refusal)
            assert status is not None
            await context.abort(*status)
        yield delivery_message(tracked.current)
        while tracked.current.status not in FINAL:
            await asyncio.sleep(self._wait(tracked.current))
            found = await self._store.track(request.delivery_id, tracked.last_event)
            assert found is not None, "deliveries are never deleted"
            tracked = found
            for change in tracked.changes:
                yield delivery_message(change)

    async def _tracked(self, delivery_id: str) -> Tracked:
        _require(delivery_id, "delivery_id")
        tracked = await self._store.track(delivery_id)
        if tracked is None:
            raise not_found(f"delivery_id {delivery_id!r}: no such delivery")
        return tracked

    def _wait(self, delivery: StoredDelivery) -> float:
        """Seconds until the delivery's next step is due, at most the poll interval."""
        due = next_due(delivery.status, delivery.trip)
        if due is None:
            return self._track_poll_s
        until_due = (due - self._store.now()).total_seconds()
        return min(self._track_poll_s, max(0.0, until_due))


def check_schedule_request(request: delivery_pb2.ScheduleDeliveryRequest) -> NewDelivery:
    """What the request asks to deliver; INVALID_ARGUMENT naming the field when it is wrong
    on its face."""
    for name in ("order_id", "restaurant_id", "address"):
        value: str = getattr(request, name)
        _require(value, name)
        if len(value) > MAX_TEXT_LENGTH:
            raise invalid(f"{name} has {len(value)} characters; the most is {MAX_TEXT_LENGTH}")
    _check_key(request.idempotency_key)
    return NewDelivery(
        order_id=request.order_id, restaurant_id=request.restaurant_id, address=request.address
    )


def _require(value: str, name: str) -> None:
    if not value.strip():
        raise invalid(f"{name} must not be empty")


def _check_key(key: str) -> None:
    problem = key_problem(key)
    if problem is not None:
        raise invalid(problem)


def _logged(outcome: Outcome) -> delivery_pb2.Delivery:
    """The outcome's response, after one log line for the change it made (none when nothing
    changed). The address is the customer's: it is not logged."""
    change = outcome.change
    if change is not None:
        delivery = change.delivery
        _log.info(
            "delivery %s of order %s: %s -> %s, %s from restaurant %s, eta %s",
            delivery.delivery_id,
            delivery.order_id,
            change.from_status or "NEW",
            delivery.status,
            delivery.courier_id,
            delivery.restaurant_id,
            delivery.trip.eta_time.isoformat(timespec="seconds"),
        )
    return outcome.response
