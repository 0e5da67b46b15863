"""OrderService on a real in-process grpc.aio server, with real users, catalog, payments and
delivery servers on databases of their own (each test on each engine: SQLite files, Postgres
databases), as it runs through the mesh in production: the request checks that name their
field and store nothing, pricing, the checkout saga's answers (CONFIRMED, REJECTED, PENDING
at the caller's deadline), idempotency under concurrent duplicates on two instances of one
database, a saga taken over by the other instance, dependency failures that keep their
code, and cancelling and watching an order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.testing import InProcessServer, MockChannel
from meshkit.saga import Leases, SagaRunner, StepRetry
from meshkit.storage.database import open_database
from services.delivery.servicer import DeliveryServicer
from services.delivery.store import DeliveriesStore
from services.delivery.trips import Fleet
from services.orders.checkout import Checkout
from services.orders.crashpoints import CRASH_ENV, CrashPoint
from services.orders.servicer import DEFAULT_DEPENDENCY_TIMEOUT_S, OrderServicer, order_placed
from services.orders.state import OrderState
from services.orders.store import OrdersStore
from services.payments.servicer import PaymentServicer
from services.payments.store import PaymentsStore
from services.users.passwords import PasswordHasher, ScryptParams
from services.users.servicer import UserServicer
from services.users.store import UsersStore
from services.users.tokens import TokenIssuer, TokenSettings
from tests.conftest import Locate
from tests.unit.demo_services import (
    AVAILABLE_ITEM_ID,
    UNAVAILABLE_ITEM_ID,
    catalog_server,
    count_rows,
    rpc_error,
)

if TYPE_CHECKING:
    from foodmesh.orders.v1.orders_pb2_grpc import OrderServiceAsyncStub as OrdersStub

MARGHERITA, CARBONARA = AVAILABLE_ITEM_ID, "roma-carbonara"  # 850 and 1250 EUR cents
SUSHI = "sakura-miso-soup"
VISA, DECLINED = "pm_card_visa", "pm_card_chargeDeclinedInsufficientFunds"
ORDER_TABLES = ("order_views", "events", "idempotent_requests")
NOTHING_STORED = dict.fromkeys(ORDER_TABLES, 0)
FAST_RETRY = StepRetry(initial_interval=0.05, maximum_interval=0.2)
S = orders_pb2.OrderStatus
PENDING, CONFIRMED = S.ORDER_STATUS_PENDING, S.ORDER_STATUS_CONFIRMED
REJECTED, CANCELLED = S.ORDER_STATUS_REJECTED, S.ORDER_STATUS_CANCELLED
WAIT_S = 10.0


def line(item_id: str, quantity: int = 1, unit_price_cents: int = 0) -> orders_pb2.OrderLine:
    return orders_pb2.OrderLine(
        item_id=item_id, quantity=quantity, unit_price_cents=unit_price_cents
    )


def order_request(*lines: orders_pb2.OrderLine, **fields: Any) -> orders_pb2.PlaceOrderRequest:
    values: dict[str, Any] = {
        "customer_id": "",  # filled in with the platform's customer by Platform.place
        "lines": list(lines) or [line(MARGHERITA)],
        "payment_method": VISA,
        "delivery_address": "1 Test Street",
    }
    values.update(fields)
    return orders_pb2.PlaceOrderRequest(**values)


@asynccontextmanager
async def serving(*services: Any) -> AsyncIterator[InProcessServer]:
    async with InProcessServer(*services) as server:
        yield server


@asynccontextmanager
async def users_server(db: Path | str) -> AsyncIterator[InProcessServer]:
    async with await UsersStore.open(db) as store:
        tokens = TokenIssuer(store.keys, TokenSettings("foodmesh-users", "foodmesh", 3600))
        servicer = UserServicer(store, PasswordHasher(ScryptParams(log2_n=10, r=8, p=1)), tokens)
        async with serving((users_pb2_grpc.add_UserServiceServicer_to_server, servicer)) as s:
            yield s


class GatedPayments(PaymentServicer):
    """Payments whose AuthorizePayment waits until the test opens the gate."""

    def __init__(self, store: PaymentsStore, gate: asyncio.Event) -> None:
        super().__init__(store)
        self.gate = gate

    async def AuthorizePayment(
        self, request: payments_pb2.AuthorizePaymentRequest, context: Any
    ) -> payments_pb2.Payment:
        await self.gate.wait()
        return await super().AuthorizePayment(request, context)


@asynccontextmanager
async def payments_server(db: Path | str, gate: asyncio.Event) -> AsyncIterator[InProcessServer]:
    async with await PaymentsStore.open(db) as store:
        add = payments_pb2_grpc.add_PaymentServiceServicer_to_server
        async with serving((add, GatedPayments(store, gate))) as server:
            yield server


@asynccontextmanager
async def delivery_server(db: Path | str, couriers: int) -> AsyncIterator[InProcessServer]:
    fleet = Fleet(couriers=couriers, trip_seconds=600)  # nobody arrives during a test
    async with await DeliveriesStore.open(db, fleet=fleet) as store:
        add = delivery_pb2_grpc.add_DeliveryServiceServicer_to_server
        async with serving((add, DeliveryServicer(store))) as server:
            yield server


@dataclass
class Participants:
    """Stubs on the servers the orders service depends on."""

    users: users_pb2_grpc.UserServiceAsyncStub
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub
    payments: payments_pb2_grpc.PaymentServiceAsyncStub
    delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub


@asynccontextmanager
async def orders_server(
    db: Path | str, participants: Participants
) -> AsyncIterator[tuple[OrdersStub, OrdersStore, SagaRunner[OrderState]]]:
    """An orders instance on db over these participants; yields a stub that calls it, its
    store and its saga runner."""
    async with await OrdersStore.open(db) as store:
        checkout = Checkout(
            participants.payments,
            participants.delivery,
            retry=FAST_RETRY,
        )
        runner: SagaRunner[OrderState] = SagaRunner(
            checkout, store, Leases(store.database, f"orders-{id(store)}", ttl=5.0)
        )
        servicer = OrderServicer(
            users=participants.users,
            catalog=participants.catalog,
            delivery=participants.delivery,
            store=store,
            runner=runner,
        )
        try:
            add = orders_pb2_grpc.add_OrderServiceServicer_to_server
            async with serving((add, servicer)) as server:
                yield orders_pb2_grpc.OrderServiceStub(server.channel), store, runner
        finally:
            await runner.close()


@dataclass
class Platform:
    """An orders server and its four participants, each on its own database."""

    locate: Locate
    participants: Participants
    orders: OrdersStub
    orders_store: OrdersStore
    orders_runner: SagaRunner[OrderState]
    customer_id: str
    stops: dict[str, AsyncExitStack]

    @property
    def orders_db(self) -> Path | str:
        return self.locate("orders")

    async def place(self, request: orders_pb2.PlaceOrderRequest, **call: Any) -> orders_pb2.Order:
        return await self.orders.PlaceOrder(self.for_customer(request), **call)

    def for_customer(self, request: orders_pb2.PlaceOrderRequest) -> orders_pb2.PlaceOrderRequest:
        mine = orders_pb2.PlaceOrderRequest()
        mine.CopyFrom(request)
        if not mine.customer_id:
            mine.customer_id = self.customer_id
        return mine

    async def stop(self, *participants: str) -> None:
        """Stop these participants' servers: a call to them fails with UNAVAILABLE."""
        for name in participants:
            await self.stops[name].aclose()

    async def stored_rows(self) -> dict[str, int]:
        return {table: await count_rows(self.orders_db, table) for table in ORDER_TABLES}

    async def payments_of(self, order_id: str) -> list[payments_pb2.Payment]:
        listed = await self.participants.payments.ListPayments(
            payments_pb2.ListPaymentsRequest(order_id=order_id)
        )
        return list(listed.payments)

    async def deliveries_of(self, order_id: str) -> list[delivery_pb2.Delivery]:
        listed = await self.participants.delivery.ListDeliveries(
            delivery_pb2.ListDeliveriesRequest(order_id=order_id)
        )
        return list(listed.deliveries)

    async def set_catalog_item(self, item_id: str, column: str, value: object) -> None:
        """Change an item as an operator would: in the catalog's database, from outside."""
        async with await open_database(self.locate("catalog")) as db:
            async with db.transaction() as transaction:
                changed = await transaction.execute(
                    f"UPDATE items SET {column} = ? WHERE item_id = ?", (value, item_id)
                )
        assert changed == 1


async def start_platform(
    locate: Locate, *, couriers: int = 50, payments_gate: asyncio.Event | None = None
) -> tuple[AsyncExitStack, Platform]:
    """The platform on the databases `locate` gives; payments authorize once payments_gate
    is set (at once when none is given)."""
    if payments_gate is None:
        payments_gate = asyncio.Event()
        payments_gate.set()
    gate = payments_gate
    stack = AsyncExitStack()
    stops: dict[str, AsyncExitStack] = {}
    servers: dict[str, Callable[[Path | str], Any]] = {
        "users": users_server,
        "catalog": catalog_server,
        "payments": lambda db: payments_server(db, gate),
        "delivery": lambda db: delivery_server(db, couriers),
    }
    stubs: dict[str, Any] = {}
    stub_types = {
        "users": users_pb2_grpc.UserServiceStub,
        "catalog": catalog_pb2_grpc.CatalogServiceStub,
        "payments": payments_pb2_grpc.PaymentServiceStub,
        "delivery": delivery_pb2_grpc.DeliveryServiceStub,
    }
    for name, server_of in servers.items():
        stops[name] = AsyncExitStack()
        stack.push_async_exit(stops[name])
        server = await stops[name].enter_async_context(server_of(locate(name)))
        # A channel of its own, outliving the server: calls after a stop are UNAVAILABLE.
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
        stubs[name] = stub_types[name](channel)
    participants = Participants(**stubs)
    user = await participants.users.CreateUser(
        users_pb2.CreateUserRequest(
            email="ada@example.com", display_name="Ada", password="correct horse battery"
        )
    )
    orders, store, runner = await stack.enter_async_context(
        orders_server(locate("orders"), participants)
    )
    return stack, Platform(locate, participants, orders, store, runner, user.user_id, stops)


@pytest.fixture
async def platform(locate: Locate) -> AsyncIterator[Platform]:
    stack, started = await start_platform(locate)
    async with stack:
        yield started


async def watched_until(
    platform: Platform, order_id: str, done: Callable[[orders_pb2.Order], bool]
) -> list[orders_pb2.Order]:
    """What WatchOrder sends until `done` holds for an update (within WAIT_S)."""
    sent: list[orders_pb2.Order] = []
    call = platform.orders.WatchOrder(
        orders_pb2.WatchOrderRequest(order_id=order_id), timeout=WAIT_S
    )
    async for order in call:
        sent.append(order)
        if done(order):
            call.cancel()
            return sent
    raise AssertionError(f"the watch ended before the condition held: {sent}")


# -- placing an order -----------------------------------------------------------------------


async def test_place_order_prices_lines_and_confirms_through_the_saga(platform: Platform) -> None:
    order = await platform.place(
        order_request(line(MARGHERITA, 2), line(CARBONARA, 1, unit_price_cents=1250))
    )
    assert order.status == CONFIRMED
    assert order.customer_id == platform.customer_id
    assert order.restaurant_id == "trattoria-roma"
    assert [(ln.item_id, ln.quantity, ln.unit_price_cents) for ln in order.lines] == [
        (MARGHERITA, 2, 850),
        (CARBONARA, 1, 1250),
    ]
    assert order.total_cents == 2 * 850 + 1250
    assert order.currency == "EUR"
    assert (order.payment_method, order.delivery_address) == (VISA, "1 Test Street")
    assert order.create_time.seconds > 0
    assert order.update_time.ToDatetime() >= order.create_time.ToDatetime()

    [payment] = await platform.payments_of(order.order_id)
    assert payment.payment_id == order.payment_id
    assert payment.status == payments_pb2.PAYMENT_STATUS_CAPTURED
    assert payment.amount_cents == order.total_cents
    [delivery] = await platform.deliveries_of(order.order_id)
    assert delivery.delivery_id == order.delivery_id
    assert delivery.status == delivery_pb2.DELIVERY_STATUS_ASSIGNED

    fetched = await platform.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.order_id))
    assert fetched == order


async def test_a_checkout_is_five_commits_and_leaves_no_lease(platform: Platform) -> None:
    """Placing takes the saga's lease, each step's record renews it, the last gives it up:
    no write of the orders database is a lease's alone."""
    database = platform.orders_store.database
    before = database.commits
    order = await platform.place(order_request(line(MARGHERITA, 1)))
    assert order.status == CONFIRMED
    # placed, authorized, scheduled, captured, confirmed
    assert database.commits - before == 5
    assert await platform.orders_store.database.fetch_all("SELECT * FROM leases") == []


async def test_next_order_takes_a_changed_catalog_price(platform: Platform) -> None:
    before = await platform.place(order_request())
    await platform.set_catalog_item(MARGHERITA, "price_cents", 990)
    after = await platform.place(order_request())
    assert before.total_cents == 850
    assert after.lines[0].unit_price_cents == 990
    assert after.total_cents == 990


async def test_declined_card_rejects_the_order_with_the_reason(platform: Platform) -> None:
    order = await platform.place(order_request(payment_method=DECLINED))
    assert order.status == REJECTED
    assert "insufficient_funds" in order.rejection_reason
    [payment] = await platform.payments_of(order.order_id)
    assert payment.status == payments_pb2.PAYMENT_STATUS_DECLINED
    assert await platform.deliveries_of(order.order_id) == []


async def test_no_courier_voids_the_payment_and_rejects(locate: Locate) -> None:
    stack, platform = await start_platform(locate, couriers=1)
    async with stack:
        first = await platform.place(order_request())
        second = await platform.place(order_request())
        assert first.status == CONFIRMED
        assert second.status == REJECTED
        assert "schedule_delivery" in second.rejection_reason
        [payment] = await platform.payments_of(second.order_id)
        assert payment.status == payments_pb2.PAYMENT_STATUS_VOIDED


LONG_TEXT = "x" * 501
INVALID_REQUESTS = {
    "customer_id must not be empty": orders_pb2.PlaceOrderRequest(
        lines=[line(MARGHERITA)], payment_method=VISA, delivery_address="1 Test Street"
    ),
    "lines must not be empty": order_request(lines=[]),
    "lines has 101": order_request(*(line(f"item-{n}") for n in range(101))),
    "idempotency_key": order_request(idempotency_key="k" * 256),
    "payment_method must not be empty": order_request(payment_method=" "),
    "delivery_address must not be empty": order_request(delivery_address=""),
    "delivery_address has 501 characters": order_request(delivery_address=LONG_TEXT),
    "lines[1].item_id must": order_request(line(MARGHERITA), line("")),
    "lines[0].quantity": order_request(line(MARGHERITA, 0)),
    "lines[1].quantity": order_request(line(CARBONARA), line(MARGHERITA, -3)),
    "lines[0].quantity must be between 1 and 1000": order_request(line(MARGHERITA, 1001)),
    "lines[0].unit_price_cents": order_request(line(MARGHERITA, 1, -1)),
    "lines[2].item_id 'roma-margherita' repeats lines[0]": order_request(
        line(MARGHERITA), line(CARBONARA), line(MARGHERITA)
    ),
}


@pytest.mark.parametrize("field", INVALID_REQUESTS)
async def test_invalid_request_is_refused_before_any_call_or_write(
    platform: Platform, field: str
) -> None:
    await platform.stop("users", "catalog")  # any call to them would fail with UNAVAILABLE
    request = INVALID_REQUESTS[field]
    if field.startswith("customer_id"):
        call = platform.orders.PlaceOrder(request)
    else:
        call = platform.place(request)
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_unknown_customer_is_not_found_and_stores_nothing(platform: Platform) -> None:
    error = await rpc_error(platform.place(order_request(customer_id="nobody")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "customer_id 'nobody'" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


@pytest.mark.parametrize(
    ("lines", "code", "named"),
    [
        ((line(MARGHERITA), line("no-such-dish")), "NOT_FOUND", "lines[1].item_id 'no-such-dish'"),
        ((line(UNAVAILABLE_ITEM_ID),), "FAILED_PRECONDITION", UNAVAILABLE_ITEM_ID),
        ((line(MARGHERITA, 1, 800),), "FAILED_PRECONDITION", "is 800, but item"),
        ((line(MARGHERITA), line(SUSHI)), "FAILED_PRECONDITION", SUSHI),
    ],
    ids=["unknown item", "unavailable item", "stale price", "two restaurants"],
)
async def test_what_the_catalog_refuses_names_the_line_and_stores_nothing(
    platform: Platform, lines: tuple[orders_pb2.OrderLine, ...], code: str, named: str
) -> None:
    error = await rpc_error(platform.place(order_request(*lines)))
    assert error.code() == grpc.StatusCode[code]
    assert named in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_items_in_two_currencies_are_failed_precondition(platform: Platform) -> None:
    await platform.set_catalog_item(CARBONARA, "currency", "CHF")
    error = await rpc_error(platform.place(order_request(line(MARGHERITA), line(CARBONARA))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CHF" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_total_beyond_int64_is_out_of_range(platform: Platform) -> None:
    await platform.set_catalog_item(MARGHERITA, "price_cents", 2**62)
    error = await rpc_error(platform.place(order_request(line(MARGHERITA, 2))))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "total" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


@pytest.mark.parametrize("down", ["catalog", "users"])
async def test_a_pricing_dependency_down_is_unavailable_naming_it(
    platform: Platform, down: str
) -> None:
    await platform.stop(down)
    error = await rpc_error(platform.place(order_request()))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"the {down} service failed" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


class ScriptedCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    """A catalog that records each call's time_remaining() and then fails with a given code."""

    def __init__(self, failure: grpc.StatusCode) -> None:
        self.failure = failure
        self.time_remaining: list[float | None] = []

    async def GetItem(
        self, request: catalog_pb2.GetItemRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> catalog_pb2.Item:
        self.time_remaining.append(context.time_remaining())
        await context.abort(self.failure, "scripted failure")


@asynccontextmanager
async def orders_on_scripted_catalog(
    platform: Platform, catalog: ScriptedCatalog
) -> AsyncIterator[OrdersStub]:
    """A second orders instance whose catalog is scripted: a MockChannel answers."""
    channel = MockChannel((catalog_pb2_grpc.add_CatalogServiceServicer_to_server, catalog))
    participants = Participants(
        platform.participants.users,
        catalog_pb2_grpc.CatalogServiceStub(channel),
        platform.participants.payments,
        platform.participants.delivery,
    )
    async with orders_server(platform.orders_db, participants) as (orders, _, _):
        yield orders


@pytest.mark.parametrize(
    ("catalog_code", "expected_code"),
    [
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_catalog_failure_keeps_its_code_and_is_never_internal(
    platform: Platform, catalog_code: grpc.StatusCode, expected_code: grpc.StatusCode
) -> None:
    async with orders_on_scripted_catalog(platform, ScriptedCatalog(catalog_code)) as orders:
        error = await rpc_error(orders.PlaceOrder(platform.for_customer(order_request())))
    assert error.code() == expected_code
    assert "catalog service failed" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_dependency_calls_get_the_inbound_remaining_time(platform: Platform) -> None:
    catalog = ScriptedCatalog(grpc.StatusCode.UNAVAILABLE)
    async with orders_on_scripted_catalog(platform, catalog) as orders:
        request = platform.for_customer(order_request())
        await rpc_error(orders.PlaceOrder(request, timeout=30))
        await rpc_error(orders.PlaceOrder(request))
    with_deadline, without_deadline = catalog.time_remaining
    assert with_deadline is not None and 0 < with_deadline <= 30 + 0.5
    assert without_deadline is not None
    assert 0 < without_deadline <= DEFAULT_DEPENDENCY_TIMEOUT_S + 0.5


# -- the caller's deadline and watching -------------------------------------------------------


async def test_a_deadline_before_the_saga_ends_answers_pending_and_the_saga_goes_on(
    locate: Locate,
) -> None:
    gate = asyncio.Event()
    stack, platform = await start_platform(locate, payments_gate=gate)
    async with stack:
        pending = await platform.place(order_request(), timeout=0.5)
        assert pending.status == PENDING
        assert pending.payment_id == ""
        gate.set()
        sent = await watched_until(platform, pending.order_id, lambda o: o.status != PENDING)
    assert sent[0].status == PENDING
    assert sent[-1].status == CONFIRMED
    assert sent[-1].payment_id


async def test_watch_sends_each_change_until_the_order_is_final(platform: Platform) -> None:
    order = await platform.place(order_request())
    cancelling = asyncio.ensure_future(
        platform.orders.CancelOrder(orders_pb2.CancelOrderRequest(order_id=order.order_id))
    )
    sent = await watched_until(platform, order.order_id, lambda o: o.status == CANCELLED)
    await cancelling
    assert [o.status for o in sent] == [CONFIRMED, CANCELLED]


@pytest.mark.parametrize(
    ("order_id", "code"), [("", "INVALID_ARGUMENT"), ("no-such-order", "NOT_FOUND")]
)
async def test_reading_no_order_names_the_order_id(
    platform: Platform, order_id: str, code: str
) -> None:
    calls = {
        "GetOrder": platform.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order_id)),
        "CancelOrder": platform.orders.CancelOrder(
            orders_pb2.CancelOrderRequest(order_id=order_id)
        ),
    }
    for method, call in calls.items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode[code], method
        assert "order_id" in (error.details() or ""), method
    with pytest.raises(grpc.aio.AioRpcError) as watched:
        async for _ in platform.orders.WatchOrder(orders_pb2.WatchOrderRequest(order_id=order_id)):
            pass
    assert watched.value.code() == grpc.StatusCode[code]
    assert "order_id" in (watched.value.details() or "")


async def test_through_the_gateway_a_user_orders_and_sees_only_their_own(
    platform: Platform,
) -> None:
    """x-user-id (what the gateway sets from a verified token): PlaceOrder takes the
    customer from it, refuses another customer_id, and someone else's order is NOT_FOUND."""
    ada = (("x-user-id", platform.customer_id),)
    grace = await platform.participants.users.CreateUser(
        users_pb2.CreateUserRequest(
            email="grace@example.com", display_name="Grace", password="correct horse battery"
        )
    )
    bob = (("x-user-id", grace.user_id),)
    mine = await platform.orders.PlaceOrder(order_request(), metadata=ada)
    assert mine.customer_id == platform.customer_id
    refused = await rpc_error(
        platform.orders.PlaceOrder(
            order_request(customer_id=platform.customer_id, idempotency_key="k-other"),
            metadata=bob,
        )
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "customer_id" in (refused.details() or "")
    request = orders_pb2.GetOrderRequest(order_id=mine.order_id)
    assert (await platform.orders.GetOrder(request, metadata=ada)).order_id == mine.order_id
    for call in (
        platform.orders.GetOrder(request, metadata=bob),
        platform.orders.CancelOrder(
            orders_pb2.CancelOrderRequest(order_id=mine.order_id), metadata=bob
        ),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == f"order_id {mine.order_id!r}: no such order"
    with pytest.raises(grpc.aio.AioRpcError) as watched:
        async for _ in platform.orders.WatchOrder(
            orders_pb2.WatchOrderRequest(order_id=mine.order_id), metadata=bob
        ):
            pass
    assert watched.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await platform.orders.GetOrder(request)).status == CONFIRMED  # inside the mesh


# -- cancelling -----------------------------------------------------------------------------


async def test_cancelling_a_confirmed_order_refunds_and_frees_the_courier(
    platform: Platform,
) -> None:
    order = await platform.place(order_request())
    request = orders_pb2.CancelOrderRequest(order_id=order.order_id)
    cancelled = await platform.orders.CancelOrder(request)
    assert cancelled.status == CANCELLED
    assert "cancelled by the customer" in cancelled.rejection_reason
    [payment] = await platform.payments_of(order.order_id)
    assert payment.status == payments_pb2.PAYMENT_STATUS_REFUNDED
    [delivery] = await platform.deliveries_of(order.order_id)
    assert delivery.status == delivery_pb2.DELIVERY_STATUS_CANCELLED
    again = await platform.orders.CancelOrder(request)
    assert again.status == CANCELLED
    assert [p.status for p in await platform.payments_of(order.order_id)] == [
        payments_pb2.PAYMENT_STATUS_REFUNDED
    ]


async def test_a_rejected_order_cannot_be_cancelled(platform: Platform) -> None:
    order = await platform.place(order_request(payment_method=DECLINED))
    error = await rpc_error(
        platform.orders.CancelOrder(orders_pb2.CancelOrderRequest(order_id=order.order_id))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "REJECTED" in (error.details() or "")


# -- idempotency ----------------------------------------------------------------------------


async def test_same_key_and_request_returns_the_first_order(platform: Platform) -> None:
    first = await platform.place(order_request(idempotency_key="key-1"))
    await platform.set_catalog_item(MARGHERITA, "available", 0)
    retry = await platform.place(order_request(idempotency_key="key-1"))
    assert retry == first
    assert (await platform.stored_rows())["order_views"] == 1
    assert len(await platform.payments_of(first.order_id)) == 1


async def test_retry_is_answered_even_while_the_dependencies_are_down(
    platform: Platform,
) -> None:
    first = await platform.place(order_request(idempotency_key="key-1"))
    await platform.stop("users", "catalog", "payments", "delivery")
    retry = await platform.place(order_request(idempotency_key="key-1"))
    assert retry.order_id == first.order_id
    assert retry.status == CONFIRMED


@pytest.mark.parametrize(
    "other",
    [
        order_request(line(MARGHERITA, 2)),
        order_request(line(CARBONARA)),
        order_request(line(MARGHERITA, 1, 850)),
        order_request(payment_method="pm_card_mastercard"),
        order_request(delivery_address="2 Other Street"),
        order_request(customer_id="bob"),
    ],
    ids=["quantity", "item", "price", "payment_method", "delivery_address", "customer_id"],
)
async def test_same_key_with_another_request_is_already_exists(
    platform: Platform, other: orders_pb2.PlaceOrderRequest
) -> None:
    await platform.place(order_request(idempotency_key="key-1"))
    reused = orders_pb2.PlaceOrderRequest()
    reused.CopyFrom(other)
    reused.idempotency_key = "key-1"
    before = await platform.stored_rows()
    error = await rpc_error(platform.place(reused))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'key-1'" in (error.details() or "")
    assert await platform.stored_rows() == before


async def test_empty_key_does_not_deduplicate(platform: Platform) -> None:
    first = await platform.place(order_request())
    second = await platform.place(order_request())
    assert first.order_id != second.order_id
    assert (await platform.stored_rows())["order_views"] == 2


async def test_concurrent_duplicates_on_two_instances_make_one_order_and_one_payment(
    platform: Platform,
) -> None:
    second = orders_server(platform.orders_db, platform.participants)
    async with second as (second_instance, _, _):
        instances = (platform.orders, second_instance)
        request = platform.for_customer(order_request(idempotency_key="dup"))
        orders = await asyncio.gather(*(instances[n % 2].PlaceOrder(request) for n in range(16)))
    assert len({order.order_id for order in orders}) == 1
    assert {order.status for order in orders} == {CONFIRMED}
    assert (await platform.stored_rows())["order_views"] == 1
    assert len(await platform.payments_of(orders[0].order_id)) == 1
    assert len(await platform.deliveries_of(orders[0].order_id)) == 1


async def test_concurrent_place_on_two_stores_of_one_database_creates_one_order(
    locate: Locate,
) -> None:
    db_path = locate("orders")
    request = orders_pb2.PlaceOrderRequest(
        customer_id="alice",
        lines=[line(MARGHERITA)],
        payment_method=VISA,
        delivery_address="1 Test Street",
        idempotency_key="dup",
    )
    item = catalog_pb2.Item(
        item_id=MARGHERITA, restaurant_id="trattoria-roma", price_cents=850, currency="EUR"
    )
    first, second = await asyncio.gather(OrdersStore.open(db_path), OrdersStore.open(db_path))
    async with first, second:
        placed = await asyncio.gather(
            *(
                store.place(order_placed(request, [item]), store.placing.key_of(request))
                for store in (first, second) * 10
            )
        )
    assert sum(created for _, created in placed) == 1
    assert len({state.order_id for state, _ in placed}) == 1
    assert await count_rows(db_path, "order_views") == 1


async def test_a_stopped_instances_saga_is_taken_over_by_the_other_once_its_lease_is_free(
    locate: Locate,
) -> None:
    """While the instance that placed the order holds the saga's lease, the other's recovery
    leaves the saga alone; once it stops (and gives the lease up), the other drives it to
    its end, with one payment."""
    gate = asyncio.Event()
    stack, platform = await start_platform(locate, payments_gate=gate)
    async with stack:
        request = platform.for_customer(order_request())
        async with orders_server(platform.orders_db, platform.participants) as (first, _, _):
            pending = await first.PlaceOrder(request, timeout=0.5)
            assert pending.status == PENDING
            unfinished = await platform.orders_store.unfinished()
            assert unfinished == [pending.order_id]
            assert await platform.orders_runner.recover(unfinished) == 0, "the lease is held"
        gate.set()
        assert await platform.orders_runner.recover(await platform.orders_store.unfinished()) == 1
        sent = await watched_until(platform, pending.order_id, lambda o: o.status != PENDING)
        assert sent[-1].status == CONFIRMED
        assert len(await platform.payments_of(pending.order_id)) == 1
        assert await platform.orders_store.unfinished() == []


@pytest.mark.parametrize("value", ["after", "during:capture_payment", "before:pay", ":"])
def test_a_crash_switch_naming_no_point_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match=CRASH_ENV) as refused:
        CrashPoint.parse(value, ("authorize_payment", "capture_payment"))
    assert "before, after, before-undo, after-undo" in str(refused.value)
