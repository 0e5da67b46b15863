"""PaymentService on real in-process grpc.aio servers and real databases (a SQLite file, and a
Postgres database: every store test runs on both): the test cards' outcomes, the strict state
rules, refusals that name their field and store nothing, and the idempotency ledger, also under
concurrent duplicates reaching two instances on one database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from mesh.testing import InProcessServer
from meshkit.storage.database import open_database
from services.payments.servicer import TEST_CARDS, PaymentServicer
from services.payments.store import PaymentsStore
from tests.conftest import Locate
from tests.unit.demo_services import count_rows, rpc_error

if TYPE_CHECKING:
    from foodmesh.payments.v1.payments_pb2_grpc import PaymentServiceAsyncStub as PaymentsStub

TABLES = ("payments", "payment_events", "idempotent_requests")
NOTHING_STORED = dict.fromkeys(TABLES, 0)
Location = Path | str
"""A payments database: a SQLite file's path, or a Postgres URL."""
START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
S = payments_pb2.PaymentStatus
AUTHORIZED, DECLINED = S.PAYMENT_STATUS_AUTHORIZED, S.PAYMENT_STATUS_DECLINED
CAPTURED, VOIDED, REFUNDED = (
    S.PAYMENT_STATUS_CAPTURED,
    S.PAYMENT_STATUS_VOIDED,
    S.PAYMENT_STATUS_REFUNDED,
)


class SteppingClock:
    """Each reading is one second after the previous one, from START."""

    def __init__(self) -> None:
        self.readings = 0

    def __call__(self) -> datetime:
        self.readings += 1
        return START + timedelta(seconds=self.readings - 1)


def authorize_request(**fields: Any) -> payments_pb2.AuthorizePaymentRequest:
    values: dict[str, Any] = {
        "order_id": "order-1",
        "customer_id": "alice",
        "amount_cents": 2350,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
    }
    values.update(fields)
    return payments_pb2.AuthorizePaymentRequest(**values)


# action -> (RPC name, request type): the three transitions of an existing payment.
ACTIONS: dict[str, tuple[str, Callable[..., Any]]] = {
    "capture": ("CapturePayment", payments_pb2.CapturePaymentRequest),
    "void": ("VoidPayment", payments_pb2.VoidPaymentRequest),
    "refund": ("RefundPayment", payments_pb2.RefundPaymentRequest),
}


def act(stub: PaymentsStub, action: str, payment_id: str, key: str = "") -> Any:
    """The call of one transition (a capture, void or refund), not yet awaited."""
    method, request_type = ACTIONS[action]
    return getattr(stub, method)(request_type(payment_id=payment_id, idempotency_key=key))


@asynccontextmanager
async def payments_server(db: Location, clock: SteppingClock) -> AsyncIterator[PaymentsStub]:
    """A payments service on the database at db; yields a stub that calls it."""
    async with await PaymentsStore.open(db, clock=clock) as store:
        add = payments_pb2_grpc.add_PaymentServiceServicer_to_server
        async with InProcessServer((add, PaymentServicer(store))) as server:
            yield payments_pb2_grpc.PaymentServiceStub(server.channel)


@dataclass
class Payments:
    """A payments server on its database."""

    stub: PaymentsStub
    db: Location

    async def stored_rows(self) -> dict[str, int]:
        return {table: await count_rows(self.db, table) for table in TABLES}

    async def events(self, payment_id: str) -> list[tuple[str | None, str]]:
        """The payment's history as (from, to) statuses, oldest first."""
        async with await open_database(self.db) as database:
            rows = await database.fetch_all(
                "SELECT from_status, to_status FROM payment_events WHERE payment_id = ?"
                " ORDER BY event_id",
                (payment_id,),
            )
        return [(row["from_status"], row["to_status"]) for row in rows]

    async def payment_in(self, status: int) -> payments_pb2.Payment:
        """A new payment brought into status by the legal path."""
        method = "pm_card_chargeDeclined" if status == DECLINED else "pm_card_visa"
        payment = await self.stub.AuthorizePayment(authorize_request(payment_method=method))
        path = {CAPTURED: ["capture"], VOIDED: ["void"], REFUNDED: ["capture", "refund"]}
        for action in path.get(status, []):
            payment = await act(self.stub, action, payment.payment_id)
        assert payment.status == status
        return payment


@pytest.fixture
async def payments(locate: Locate) -> AsyncIterator[Payments]:
    """A payments server on the test's engine."""
    db = locate("payments")
    async with payments_server(db, SteppingClock()) as stub:
        yield Payments(stub, db)


@pytest.mark.parametrize("method", ["pm_card_visa", "pm_card_mastercard"])
async def test_approved_card_authorizes(payments: Payments, method: str) -> None:
    payment = await payments.stub.AuthorizePayment(authorize_request(payment_method=method))
    assert payment.payment_id.startswith("p-")
    assert payment.status == AUTHORIZED
    assert payment.decline_reason == ""
    assert (payment.order_id, payment.customer_id) == ("order-1", "alice")
    assert (payment.amount_cents, payment.currency) == (2350, "EUR")
    assert payment.payment_method == method
    assert payment.create_time.ToDatetime(tzinfo=UTC) == START
    assert payment.update_time == payment.create_time

    fetched = await payments.stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=payment.payment_id)
    )
    assert fetched == payment
    assert await payments.events(payment.payment_id) == [(None, "AUTHORIZED")]


@pytest.mark.parametrize(
    ("method", "reason"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
async def test_declining_card_stores_a_declined_payment(
    payments: Payments, method: str, reason: str
) -> None:
    payment = await payments.stub.AuthorizePayment(authorize_request(payment_method=method))
    assert payment.status == DECLINED
    assert payment.decline_reason == reason
    listed = await payments.stub.ListPayments(payments_pb2.ListPaymentsRequest(order_id="order-1"))
    assert list(listed.payments) == [payment]
    assert await payments.events(payment.payment_id) == [(None, "DECLINED")]


def test_the_test_cards_are_the_four_of_the_contract() -> None:
    assert set(TEST_CARDS) == {
        "pm_card_visa",
        "pm_card_mastercard",
        "pm_card_chargeDeclined",
        "pm_card_chargeDeclinedInsufficientFunds",
    }


LONG_KEY = "k" * 256
INVALID_AUTHORIZATIONS = {
    "order_id": authorize_request(order_id=""),
    "customer_id": authorize_request(customer_id=""),
    "amount_cents must be greater than 0, got 0": authorize_request(amount_cents=0),
    "amount_cents must be greater than 0, got -5": authorize_request(amount_cents=-5),
    "currency must be an ISO 4217 code of 3 upper-case letters (e.g. 'EUR'), got 'eur'": (
        authorize_request(currency="eur")
    ),
    "currency must be an ISO 4217 code of 3 upper-case letters (e.g. 'EUR'), got 'EURO'": (
        authorize_request(currency="EURO")
    ),
    "currency must be an ISO 4217 code of 3 upper-case letters (e.g. 'EUR'), got ''": (
        authorize_request(currency="")
    ),
    "currency must be an ISO 4217 code of 3 upper-case letters (e.g. 'EUR'), got 'E1R'": (
        authorize_request(currency="E1R")
    ),
    "payment_method 'pm_card_amex' is not a test payment method": authorize_request(
        payment_method="pm_card_amex"
    ),
    "payment_method '' is not a test payment method": authorize_request(payment_method=""),
    "idempotency_key has 256 characters": authorize_request(idempotency_key=LONG_KEY),
}


@pytest.mark.parametrize("message", INVALID_AUTHORIZATIONS)
async def test_invalid_authorization_names_its_field_and_stores_nothing(
    payments: Payments, message: str
) -> None:
    error = await rpc_error(payments.stub.AuthorizePayment(INVALID_AUTHORIZATIONS[message]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    assert await payments.stored_rows() == NOTHING_STORED


async def test_unknown_payment_method_lists_the_accepted_ones(payments: Payments) -> None:
    request = authorize_request(payment_method="4242424242424242", idempotency_key="k")
    error = await rpc_error(payments.stub.AuthorizePayment(request))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payment_method" in details
    for method in TEST_CARDS:
        assert method in details
    assert await payments.stored_rows() == NOTHING_STORED


@pytest.mark.parametrize("action", ACTIONS)
async def test_invalid_transition_request_names_its_field(payments: Payments, action: str) -> None:
    payment = await payments.payment_in(AUTHORIZED)
    before = await payments.stored_rows()
    no_id = await rpc_error(act(payments.stub, action, "", key="k"))
    long_key = await rpc_error(act(payments.stub, action, payment.payment_id, key=LONG_KEY))
    assert no_id.code() == long_key.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payment_id must not be empty" in (no_id.details() or "")
    assert "idempotency_key has 256 characters" in (long_key.details() or "")
    assert await payments.stored_rows() == before


async def test_invalid_read_requests_name_their_field(payments: Payments) -> None:
    get = await rpc_error(payments.stub.GetPayment(payments_pb2.GetPaymentRequest()))
    listed = await rpc_error(payments.stub.ListPayments(payments_pb2.ListPaymentsRequest()))
    assert get.code() == listed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payment_id must not be empty" in (get.details() or "")
    assert "order_id must not be empty" in (listed.details() or "")


async def test_capture_then_refund_moves_the_payment_and_records_each_change(
    payments: Payments,
) -> None:
    authorized = await payments.payment_in(AUTHORIZED)
    captured = await act(payments.stub, "capture", authorized.payment_id)
    refunded = await act(payments.stub, "refund", authorized.payment_id)
    assert (captured.status, refunded.status) == (CAPTURED, REFUNDED)
    assert captured.create_time == refunded.create_time == authorized.create_time
    assert captured.update_time.ToDatetime(tzinfo=UTC) == START + timedelta(seconds=1)
    assert refunded.update_time.ToDatetime(tzinfo=UTC) == START + timedelta(seconds=2)
    assert refunded.amount_cents == authorized.amount_cents
    fetched = await payments.stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=authorized.payment_id)
    )
    assert fetched == refunded
    assert await payments.events(authorized.payment_id) == [
        (None, "AUTHORIZED"),
        ("AUTHORIZED", "CAPTURED"),
        ("CAPTURED", "REFUNDED"),
    ]


async def test_void_releases_an_authorization(payments: Payments) -> None:
    authorized = await payments.payment_in(AUTHORIZED)
    voided = await act(payments.stub, "void", authorized.payment_id)
    assert voided.status == VOIDED
    assert await payments.events(authorized.payment_id) == [
        (None, "AUTHORIZED"),
        ("AUTHORIZED", "VOIDED"),
    ]


NEEDS = {"capture": "AUTHORIZED", "void": "AUTHORIZED", "refund": "CAPTURED"}
STATES = {"AUTHORIZED": AUTHORIZED, "DECLINED": DECLINED, "CAPTURED": CAPTURED}
STATES |= {"VOIDED": VOIDED, "REFUNDED": REFUNDED}
ILLEGAL = [(action, state) for action in ACTIONS for state in STATES if state != NEEDS[action]]


@pytest.mark.parametrize(("action", "state"), ILLEGAL)
async def test_illegal_transition_names_both_states_and_changes_nothing(
    payments: Payments, action: str, state: str
) -> None:
    payment = await payments.payment_in(STATES[state])
    before = await payments.stored_rows()
    error = await rpc_error(act(payments.stub, action, payment.payment_id, key="compensate"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"payment_id {payment.payment_id!r} is {state}; {action} needs {NEEDS[action]}"
    )
    fetched = await payments.stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=payment.payment_id)
    )
    assert fetched == payment
    assert await payments.stored_rows() == before


async def test_unknown_payment_id_is_not_found_and_stores_nothing(payments: Payments) -> None:
    calls = [
        payments.stub.GetPayment(payments_pb2.GetPaymentRequest(payment_id="p-nope")),
        *(act(payments.stub, action, "p-nope", key="k") for action in ACTIONS),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "payment_id 'p-nope': no such payment"
    assert await payments.stored_rows() == NOTHING_STORED


async def test_list_payments_returns_one_order_in_creation_order(payments: Payments) -> None:
    declined = await payments.stub.AuthorizePayment(
        authorize_request(payment_method="pm_card_chargeDeclinedInsufficientFunds")
    )
    await payments.stub.AuthorizePayment(authorize_request(order_id="order-2"))
    approved = await payments.stub.AuthorizePayment(
        authorize_request(payment_method="pm_card_mastercard")
    )
    captured = await act(payments.stub, "capture", approved.payment_id)

    listed = await payments.stub.ListPayments(payments_pb2.ListPaymentsRequest(order_id="order-1"))
    assert list(listed.payments) == [declined, captured]
    empty = await payments.stub.ListPayments(payments_pb2.ListPaymentsRequest(order_id="none"))
    assert list(empty.payments) == []


@pytest.mark.parametrize("method", ["pm_card_visa", "pm_card_chargeDeclined"])
async def test_authorize_with_a_used_key_returns_the_first_payment(
    payments: Payments, method: str
) -> None:
    request = authorize_request(payment_method=method, idempotency_key="checkout-1")
    first = await payments.stub.AuthorizePayment(request)
    again = await payments.stub.AuthorizePayment(request)
    assert again == first
    assert await payments.stored_rows() == dict.fromkeys(TABLES, 1)


async def test_authorize_without_a_key_does_not_deduplicate(payments: Payments) -> None:
    first = await payments.stub.AuthorizePayment(authorize_request())
    second = await payments.stub.AuthorizePayment(authorize_request())
    assert first.payment_id != second.payment_id
    assert await payments.stored_rows() == {
        "payments": 2,
        "payment_events": 2,
        "idempotent_requests": 0,
    }


@pytest.mark.parametrize(
    "other",
    [
        authorize_request(amount_cents=2351, idempotency_key="checkout-1"),
        authorize_request(payment_method="pm_card_mastercard", idempotency_key="checkout-1"),
        authorize_request(order_id="order-2", idempotency_key="checkout-1"),
    ],
)
async def test_authorize_reusing_a_key_with_another_request_is_already_exists(
    payments: Payments, other: payments_pb2.AuthorizePaymentRequest
) -> None:
    await payments.stub.AuthorizePayment(authorize_request(idempotency_key="checkout-1"))
    error = await rpc_error(payments.stub.AuthorizePayment(other))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'checkout-1'" in (error.details() or "")
    assert await payments.stored_rows() == dict.fromkeys(TABLES, 1)


@pytest.mark.parametrize(("action", "state"), [("capture", AUTHORIZED), ("void", AUTHORIZED)])
async def test_transition_with_a_used_key_returns_the_first_result(
    payments: Payments, action: str, state: int
) -> None:
    payment = await payments.payment_in(state)
    first = await act(payments.stub, action, payment.payment_id, key="step-1")
    again = await act(payments.stub, action, payment.payment_id, key="step-1")
    assert again == first
    assert len(await payments.events(payment.payment_id)) == 2
    assert await count_rows(payments.db, "idempotent_requests") == 1


async def test_refund_with_a_used_key_returns_the_first_result(payments: Payments) -> None:
    payment = await payments.payment_in(CAPTURED)
    first = await act(payments.stub, "refund", payment.payment_id, key="refund-1")
    again = await act(payments.stub, "refund", payment.payment_id, key="refund-1")
    assert again == first and first.status == REFUNDED
    assert await payments.events(payment.payment_id) == [
        (None, "AUTHORIZED"),
        ("AUTHORIZED", "CAPTURED"),
        ("CAPTURED", "REFUNDED"),
    ]


async def test_a_used_key_answers_as_the_first_call_left_the_payment(payments: Payments) -> None:
    payment = await payments.payment_in(AUTHORIZED)
    captured = await act(payments.stub, "capture", payment.payment_id, key="step")
    await act(payments.stub, "refund", payment.payment_id, key="step")  # keys are per RPC
    replayed = await act(payments.stub, "capture", payment.payment_id, key="step")
    assert replayed == captured and replayed.status == CAPTURED
    current = await payments.stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=payment.payment_id)
    )
    assert current.status == REFUNDED


async def test_a_repeat_with_a_new_key_is_refused_by_the_strict_rule(payments: Payments) -> None:
    payment = await payments.payment_in(AUTHORIZED)
    await act(payments.stub, "void", payment.payment_id, key="saga-void")
    error = await rpc_error(act(payments.stub, "void", payment.payment_id, key="another"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is VOIDED; void needs AUTHORIZED" in (error.details() or "")


async def test_transition_reusing_a_key_for_another_payment_is_already_exists(
    payments: Payments,
) -> None:
    one, two = await payments.payment_in(AUTHORIZED), await payments.payment_in(AUTHORIZED)
    await act(payments.stub, "capture", one.payment_id, key="capture-1")
    error = await rpc_error(act(payments.stub, "capture", two.payment_id, key="capture-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'capture-1'" in (error.details() or "")
    untouched = await payments.stub.GetPayment(
        payments_pb2.GetPaymentRequest(payment_id=two.payment_id)
    )
    assert untouched == two
    assert await payments.events(two.payment_id) == [(None, "AUTHORIZED")]


@asynccontextmanager
async def two_instances(db: Location) -> AsyncIterator[tuple[PaymentsStub, PaymentsStub]]:
    """Two payments servers, each with its own connection to one database."""
    clock = SteppingClock()
    async with payments_server(db, clock) as one, payments_server(db, clock) as two:
        yield one, two


async def test_concurrent_duplicate_authorizations_on_two_instances_make_one_payment(
    locate: Locate,
) -> None:
    db = locate("payments")
    request = authorize_request(idempotency_key="checkout-1")
    async with two_instances(db) as stubs:
        responses = await asyncio.gather(
            *(stubs[i % 2].AuthorizePayment(request) for i in range(10))
        )
    assert len({r.SerializeToString() for r in responses}) == 1
    assert {table: await count_rows(db, table) for table in TABLES} == dict.fromkeys(TABLES, 1)


async def test_concurrent_duplicate_captures_on_two_instances_capture_once(
    locate: Locate,
) -> None:
    db = locate("payments")
    async with two_instances(db) as stubs:
        payment = await stubs[0].AuthorizePayment(authorize_request())
        responses = await asyncio.gather(
            *(act(stubs[i % 2], "capture", payment.payment_id, key="c") for i in range(10))
        )
    assert {r.status for r in responses} == {CAPTURED}
    assert len({r.SerializeToString() for r in responses}) == 1
    assert await count_rows(db, "payment_events") == 2


async def test_concurrent_captures_with_different_keys_capture_once(locate: Locate) -> None:
    db = locate("payments")
    async with two_instances(db) as stubs:
        payment = await stubs[0].AuthorizePayment(authorize_request())
        results = await asyncio.gather(
            *(act(stubs[i % 2], "capture", payment.payment_id, key=f"c{i}") for i in range(10)),
            return_exceptions=True,
        )
    captured = [r for r in results if isinstance(r, payments_pb2.Payment)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(captured) == 1 and len(refused) == 9
    assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert await count_rows(db, "payment_events") == 2


async def test_each_state_change_logs_one_line_without_card_data(
    payments: Payments, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.payments.servicer")
    payment = await payments.stub.AuthorizePayment(authorize_request(idempotency_key="k"))
    await payments.stub.AuthorizePayment(authorize_request(idempotency_key="k"))  # no change
    await act(payments.stub, "capture", payment.payment_id)
    await rpc_error(act(payments.stub, "capture", payment.payment_id))  # refused: no change
    lines = [r.getMessage() for r in caplog.records if r.name == "services.payments.servicer"]
    assert lines == [
        f"payment {payment.payment_id} of order order-1: NEW -> AUTHORIZED, "
        "2350 EUR cents by pm_card_visa",
        f"payment {payment.payment_id} of order order-1: AUTHORIZED -> CAPTURED, "
        "2350 EUR cents by pm_card_visa",
    ]
