"""The checkout saga: authorize the payment, schedule a delivery, capture the payment.

    step               action               compensation
    authorize_payment  AuthorizePayment     void every AUTHORIZED payment of the order
    schedule_delivery  ScheduleDelivery     cancel every active delivery of the order
    capture_payment    CapturePayment       refund every CAPTURED payment of the order

A decline is not an error: AuthorizePayment answers DECLINED, the order is REJECTED with the
decline reason, and nothing is undone. Any step refused for good (no courier: FAILED_
PRECONDITION) or still failing at the saga's deadline turns the saga around. Compensations
look up what the participant holds for the order (ListPayments, ListDeliveries) instead of
trusting the ids in the order's state, because the step that failed may have had its effect
without its answer reaching us (a timeout); each undo call carries a key derived from the
saga, the step and the participant's id, so a repeated compensation has one effect.

The customer check and the pricing come before the order exists (services/orders/servicer.py):
an unknown customer or item means no order at all, so there is nothing to compensate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from foodmesh.orders.v1 import events_pb2
from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from meshkit.saga import Progress, Step, StepContext, StepRetry
from services.orders.crashpoints import CrashPoint, crashing
from services.orders.state import AUTHORIZE, CANCELLED_BY_CUSTOMER, CAPTURE, SCHEDULE, OrderState

DEFAULT_SAGA_TIMEOUT_S = 30.0

Payment = payments_pb2.Payment
Delivery = delivery_pb2.Delivery


@dataclass
class Checkout:
    """The checkout saga's definition over the payments and delivery stubs."""

    payments: payments_pb2_grpc.PaymentServiceAsyncStub
    delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub
    timeout_s: float = DEFAULT_SAGA_TIMEOUT_S
    retry: StepRetry = field(default_factory=StepRetry)
    name: str = "checkout"
    crash_at: CrashPoint | None = None
    """Test-only: where this process kills itself (services/orders/crashpoints.py)."""

    @property
    def steps(self) -> Sequence[Step[OrderState]]:
        steps = (
            Step(AUTHORIZE, self.authorize, self.void, self.retry),
            Step(SCHEDULE, self.schedule, self.cancel_delivery, self.retry),
            Step(CAPTURE, self.capture, self.refund, self.retry),
        )
        return steps if self.crash_at is None else crashing(steps, self.crash_at)

    # -- the saga's outcomes ------------------------------------------------------------

    def progress(self, state: OrderState) -> Progress:
        return state.progress

    def deadline(self, state: OrderState) -> float:
        return state.placed.create_time.ToDatetime().timestamp() + self.timeout_s

    def failed(self, state: OrderState, step: str, reason: str) -> Sequence[Message]:
        return [events_pb2.CheckoutFailed(order_id=state.order_id, step=step, reason=reason)]

    def compensated(self, state: OrderState, step: str) -> Sequence[Message]:
        return [events_pb2.StepCompensated(order_id=state.order_id, step=step)]

    def completed(self, state: OrderState) -> Sequence[Message]:
        return [events_pb2.OrderConfirmed(order_id=state.order_id)]

    def aborted(self, state: OrderState) -> Sequence[Message]:
        if state.progress.failure == CANCELLED_BY_CUSTOMER:
            return [events_pb2.OrderCancelled(order_id=state.order_id)]
        reason = state.progress.failure or "checkout failed"
        return [events_pb2.OrderRejected(order_id=state.order_id, reason=reason)]

    # -- steps --------------------------------------------------------------------------

    async def authorize(self, state: OrderState, step: StepContext) -> Sequence[Message]:
        placed = state.placed
        payment = await self.payments.AuthorizePayment(
            payments_pb2.AuthorizePaymentRequest(
                order_id=placed.order_id,
                customer_id=placed.customer_id,
                amount_cents=placed.total_cents,
                currency=placed.currency,
                payment_method=placed.payment_method,
                idempotency_key=step.idempotency_key(),
            ),
            timeout=step.timeout,
        )
        if payment.status == payments_pb2.PAYMENT_STATUS_DECLINED:
            return [
                events_pb2.PaymentDeclined(
                    order_id=placed.order_id,
                    payment_id=payment.payment_id,
                    decline_reason=payment.decline_reason,
                )
            ]
        return [
            events_pb2.PaymentAuthorized(order_id=placed.order_id, payment_id=payment.payment_id)
        ]

    async def schedule(self, state: OrderState, step: StepContext) -> Sequence[Message]:
        placed = state.placed
        scheduled = await self.delivery.ScheduleDelivery(
            delivery_pb2.ScheduleDeliveryRequest(
                order_id=placed.order_id,
                restaurant_id=placed.restaurant_id,
                address=placed.delivery_address,
                idempotency_key=step.idempotency_key(),
            ),
            timeout=step.timeout,
        )
        return [
            events_pb2.DeliveryScheduled(
                order_id=placed.order_id,
                delivery_id=scheduled.delivery_id,
                courier_id=scheduled.courier_id,
                eta_time=scheduled.eta_time,
            )
        ]

    async def capture(self, state: OrderState, step: StepContext) -> Sequence[Message]:
        await self.payments.CapturePayment(
            payments_pb2.CapturePaymentRequest(
                payment_id=state.payment_id, idempotency_key=step.idempotency_key()
            ),
            timeout=step.timeout,
        )
        return [events_pb2.PaymentCaptured(order_id=state.order_id, payment_id=state.payment_id)]

    # -- compensations ------------------------------------------------------------------

    async def void(self, state: OrderState, step: StepContext) -> Sequence[Message]:
        for payment in await self._payments(state, step, payments_pb2.PAYMENT_STATUS_AUTHORIZED):
            await self.payments.VoidPayment(
                payments_pb2.VoidPaymentRequest(
                    payment_id=payment.payment_id,
                    idempotency_key=step.idempotency_key(payment.payment_id),
                ),
                timeout=step.timeout,
            )
        return ()

    async def refund(self, state: OrderState, step: StepContext) -> Sequence[Message]:
        for payment in await self._payments(state, step, payments_pb2.PAYMENT_STATUS_CAPTURED):
            await self.payments.RefundPayment(
                payments_pb2.RefundPaymentRequest(
                    payment_id=payment.payment_id,
                    idempotency_key=step.idempotency_key(payment.payment_id),
                ),
                timeout=step.timeout,
            )
        return ()

    async def cancel_delivery(self, state: OrderState, step: StepContext) -> Sequence[Message]:
        listed = await self.delivery.ListDeliveries(
            delivery_pb2.ListDeliveriesRequest(order_id=state.order_id), timeout=step.timeout
        )
        for delivery in listed.deliveries:
            if delivery.status == delivery_pb2.DELIVERY_STATUS_ASSIGNED:
                await self.delivery.CancelDelivery(
                    delivery_pb2.CancelDeliveryRequest(
                        delivery_id=delivery.delivery_id,
                        idempotency_key=step.idempotency_key(delivery.delivery_id),
                    ),
                    timeout=step.timeout,
                )
        return ()

    async def _payments(self, state: OrderState, step: StepContext, status: int) -> list[Payment]:
        listed = await self.payments.ListPayments(
            payments_pb2.ListPaymentsRequest(order_id=state.order_id), timeout=step.timeout
        )
        return [p for p in listed.payments if p.status == status]
