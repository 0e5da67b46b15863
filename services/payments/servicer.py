"""foodmesh.payments.v1.PaymentService on top of PaymentsStore: a simulated payment provider.

The provider follows Stripe's test-card convention: the payment_method token alone decides the
outcome (TEST_CARDS), so a demo can ask for a decline on purpose and no card data ever reaches
the service. A decline is an answer, not an error: it is stored and returned as a DECLINED
payment, because the caller's request was valid and the order's history should show it. An
unknown token is INVALID_ARGUMENT listing the accepted ones, so a typo is never mistaken for a
decline.

Everything the request alone can show wrong is refused before the store is touched, with a
message naming the field. The state rules and the idempotency ledger live in the store's
transaction (see store.py); the servicer logs one line per state change, with the payment
method's name and never more about the card.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from meshkit.storage.idempotency import key_problem
from services.payments.store import (
    AUTHORIZE,
    CAPTURE,
    REFUND,
    VOID,
    NewPayment,
    Outcome,
    PaymentsStore,
    PaymentStatus,
    Transition,
    payment_message,
)
from services.refusals import invalid, not_found, refusing

ServicerContext = grpc.aio.ServicerContext[object, object]
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CardOutcome:
    """What the simulated provider answers for a test payment method."""

    status: PaymentStatus
    decline_reason: str = ""


TEST_CARDS: Mapping[str, CardOutcome] = {
    "pm_card_visa": CardOutcome(PaymentStatus.AUTHORIZED),
    "pm_card_mastercard": CardOutcome(PaymentStatus.AUTHORIZED),
    "pm_card_chargeDeclined": CardOutcome(PaymentStatus.DECLINED, "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": CardOutcome(
        PaymentStatus.DECLINED, "insufficient_funds"
    ),
}
"""The accepted payment methods (Stripe's test tokens) and the provider's answer to each."""

_CURRENCY = re.compile(r"[A-Z]{3}")


class PaymentServicer(payments_pb2_grpc.PaymentServiceServicer):
    """Authorizes, captures, voids and refunds payments, and reads them back."""

    def __init__(self, store: PaymentsStore) -> None:
        self._store = store

    @refusing
    async def AuthorizePayment(
        self, request: payments_pb2.AuthorizePaymentRequest, context: ServicerContext
    ) -> payments_pb2.Payment:
        card = check_authorize_request(request)
        new = NewPayment(
            order_id=request.order_id,
            customer_id=request.customer_id,
            amount_cents=request.amount_cents,
            currency=request.currency,
            payment_method=request.payment_method,
            status=card.status,
            decline_reason=card.decline_reason,
        )
        outcome = await self._store.authorize(new, AUTHORIZE.key_of(request))
        return _logged(outcome)

    @refusing
    async def CapturePayment(
        self, request: payments_pb2.CapturePaymentRequest, context: ServicerContext
    ) -> payments_pb2.Payment:
        return await self._move(request, CAPTURE)

    @refusing
    async def VoidPayment(
        self, request: payments_pb2.VoidPaymentRequest, context: ServicerContext
    ) -> payments_pb2.Payment:
        return await self._move(request, VOID)

    @refusing
    async def RefundPayment(
        self, request: payments_pb2.RefundPaymentRequest, context: ServicerContext
    ) -> payments_pb2.Payment:
        return await self._move(request, REFUND)

    @refusing
    async def GetPayment(
        self, request: payments_pb2.GetPaymentRequest, context: ServicerContext
    ) -> payments_pb2.Payment:
        _require_payment_id(request.payment_id)
        payment = await self._store.get(request.payment_id)
        if payment is None:
            raise not_found(f"payment_id {request.payment_id!r}: no such payment")
        return payment_message(payment)

    @refusing
    async def ListPayments(
        self, request: payments_pb2.ListPaymentsRequest, context: ServicerContext
    ) -> payments_pb2.ListPaymentsResponse:
        if not request.order_id:
            raise invalid("order_id must not be empty")
        payments = await self._store.list_for_order(request.order_id)
        return payments_pb2.ListPaymentsResponse(payments=[payment_message(p) for p in payments])

    async def _move(
        self,
        request: (
            payments_pb2.CapturePaymentRequest
            | payments_pb2.VoidPaymentRequest
            | payments_pb2.RefundPaymentRequest
        ),
        transition: Transition,
    ) -> payments_pb2.Payment:
        _require_payment_id(request.payment_id)
        _check_key(request.idempotency_key)
        key = transition.ledger.key_of(request)
        return _logged(await self._store.move(request.payment_id, transition, key))


def check_authorize_request(request: payments_pb2.AuthorizePaymentRequest) -> CardOutcome:
    """The provider's answer to a valid request; INVALID_ARGUMENT naming the field when the
    request is wrong on its face."""
    if not request.order_id:
        raise invalid("order_id must not be empty")
    if not request.customer_id:
        raise invalid("customer_id must not be empty")
    if request.amount_cents <= 0:
        raise invalid(f"amount_cents must be greater than 0, got {request.amount_cents}")
    if not _CURRENCY.fullmatch(request.currency):
        raise invalid(
            "currency must be an ISO 4217 code of 3 upper-case letters (e.g. 'EUR'), "
            f"got {request.currency!r}"
        )
    card = TEST_CARDS.get(request.payment_method)
    if card is None:
        accepted = ", ".join(TEST_CARDS)
        raise invalid(
            f"payment_method {request.payment_method!r} is not a test payment method; "
            f"use one of {accepted}"
        )
    _check_key(request.idempotency_key)
    return card


def _require_payment_id(payment_id: str) -> None:
    if not payment_id:
        raise invalid("payment_id must not be empty")


def _check_key(key: str) -> None:
    problem = key_problem(key)
    if problem is not None:
        raise invalid(problem)


def _logged(outcome: Outcome) -> payments_pb2.Payment:
    """The outcome's response, after one log line for the state change it made (none for a
    repeated idempotency key)."""
    change = outcome.change
    if change is not None:
        payment = change.payment
        reason = f" ({payment.decline_reason})" if payment.decline_reason else ""
        _log.info(
            "payment %s of order %s: %s -> %s%s, %d %s cents by %s",
            payment.payment_id,
            payment.order_id,
            change.from_status or "NEW",
            payment.status,
            reason,
            payment.amount_cents,
            payment.currency,
            payment.payment_method,
        )
    return outcome.response
