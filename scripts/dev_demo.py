"""The dev stack's demo: a user who logs in and places two orders through the mesh, and how
they are shown.

Why: instances that all pass their health checks can still be wired wrong. The demo takes the
paths a user's app takes, on mesh channels that find users and orders in Consul: it creates
the demo user, logs in, and places two orders whose checkout sagas end the two ways a checkout
ends. One paid with a card that works must come back CONFIRMED (our process -> orders ->
users, catalog, payments, delivery); one paid with a card that is declined must come back
REJECTED, with nothing left to undo. Then the customer's notifications of both outcomes must
come, made by the notifications service from the orders' events (orders' outbox -> NATS
JetStream -> notifications), and the customer's order history must show both orders in
their outcomes with the restaurant's and the items' names (order-history, made from the
orders', delivery's and the catalog's events). An order that ends otherwise, or a
notification or history entry that does not come, fails the startup, as a call that fails
does: the stack does not work, and the logs of the services involved say why.

The data dir outlives a run, and the demo user with it: a rerun finds the email taken
(ALREADY_EXISTS) and logs in all the same, so the user_id to use is always Login's. Each step
is traced from our process on under a root span of its own, so that each trace id can be
printed and its waterfall drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource

import mesh
from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from foodmesh.orderhistory.v1 import orderhistory_pb2, orderhistory_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.discovery import ConsulResolver, ConsulSettings
from mesh.telemetry.tracing import Tracing, tracing_to
from scripts.dev_console import say
from scripts.dev_processes import StartupFailed
from scripts.dev_traces import ReceiverProcess, waterfall_command


@dataclass(frozen=True)
class DemoUser:
    email: str
    display_name: str
    password: str


DEMO_USER = DemoUser("demo@foodmesh.example", "Dev Stack Demo", "dev-stack-demo")
DEMO_ADDRESS = "1 Demo Street, Springfield"
PAYMENT_METHOD = "pm_card_visa"
DECLINED_PAYMENT_METHOD = "pm_card_chargeDeclined"
"""Stripe's test card that is always declined (generic_decline): the saga rejects the order."""
DEMO_LINES = (("roma-margherita", 2), ("roma-carbonara", 1))
DECLINED_LINES = (("roma-margherita", 1),)
DEMO_CALL_TIMEOUT_S = 15.0
"""Per call; PlaceOrder returns once its saga is CONFIRMED or REJECTED, well within this."""
USER_SPAN = "dev-stack demo user"
ORDER_SPAN = "dev-stack demo order"
NOTIFICATION_TIMEOUT_S = 15.0
NOTIFYING = ("orders", "notifications")
"""Whose logs tell why a notification did not come: the relay's, and the consumer's."""
HISTORY = ("orders", "delivery", "catalog", "order-history")
"""Whose logs tell why the order history did not show an order: the relays', the consumer's."""
ORDER_SERVICES = ("orders", "payments", "delivery")
"""Whose logs tell why an order failed: orders (which names any dependency that failed), and
the participants of its checkout saga."""

T = TypeVar("T")
ServiceLogs = Mapping[str, Sequence[Path]]
"""The log files of each service's instances, by service name."""


@dataclass(frozen=True)
class PlacedOrder:
    order: orders_pb2.Order
    trace_id: str
    """The trace of the PlaceOrder call; "" when tracing is off."""


@dataclass(frozen=True)
class Demo:
    """What the demo did: who it logged in as, and the two orders it placed."""

    login: users_pb2.LoginResponse
    created: bool
    """False when the email was taken already (the user of an earlier run on this data dir)."""
    user_trace_id: str
    confirmed: PlacedOrder
    rejected: PlacedOrder
    notifications: tuple[notifications_pb2.Notification, ...]
    """What the notifications service made of the two orders' events (through NATS)."""
    history: tuple[orderhistory_pb2.CustomerOrder, ...]
    """The two orders as the order history tells them (made from events)."""

    @property
    def user_id(self) -> str:
        return str(self.login.user_id)


def run_demo(consul_addr: str, otlp_endpoint: str, logs: ServiceLogs) -> Demo:
    """Create (or find) the demo user, log in, and place the two demo orders, through the
    Consul at ``consul_addr``; traced to ``otlp_endpoint`` ("" for no tracing). A failed call,
    or an order that does not end as it should, is a StartupFailed with the logs (from
    ``logs``) of the services involved."""
    return asyncio.run(_run_demo(consul_addr, otlp_endpoint, logs))


async def _run_demo(consul_addr: str, otlp_endpoint: str, logs: ServiceLogs) -> Demo:
    tracing = None
    if otlp_endpoint:
        tracing = tracing_to(otlp_endpoint, Resource.create({"service.name": "dev-stack"}))
    resolver = ConsulResolver(ConsulSettings.parse(consul_addr))
    users_channel = mesh.channel("users", resolver=resolver, tracing=tracing)
    orders_channel = mesh.channel("orders", resolver=resolver, tracing=tracing)
    notifications_channel = mesh.channel("notifications", resolver=resolver, tracing=tracing)
    history_channel = mesh.channel("order-history", resolver=resolver, tracing=tracing)
    try:
        users = users_pb2_grpc.UserServiceStub(users_channel)
        orders = orders_pb2_grpc.OrderServiceStub(orders_channel)
        with _failing_as_startup("the demo user", _logs_of(logs, ("users",))):
            created, login, user_trace_id = await _log_in(users, tracing)
        placing = _Placing(orders, tracing, _logs_of(logs, ORDER_SERVICES), login.user_id)
        confirmed = await placing.place(
            PAYMENT_METHOD, DEMO_LINES, expected=orders_pb2.ORDER_STATUS_CONFIRMED
        )
        rejected = await placing.place(
            DECLINED_PAYMENT_METHOD, DECLINED_LINES, expected=orders_pb2.ORDER_STATUS_REJECTED
        )
        placed = (confirmed.order, rejected.order)
        with _failing_as_startup("the demo's notifications", _logs_of(logs, NOTIFYING)):
            notified = await _notifications(
                notifications_pb2_grpc.NotificationServiceStub(notifications_channel),
                login.user_id,
                [o.order_id for o in placed],
                _logs_of(logs, NOTIFYING),
            )
        with _failing_as_startup("the demo's order history", _logs_of(logs, HISTORY)):
            history = await _order_history(
                orderhistory_pb2_grpc.OrderHistoryServiceStub(history_channel),
                login.user_id,
                placed,
                _logs_of(logs, HISTORY),
            )
        return Demo(login, created, user_trace_id, confirmed, rejected, notified, history)
    finally:
        await history_channel.close()
        await notifications_channel.close()
        await orders_channel.close()
        await users_channel.close()
        await resolver.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # flushes; the exporter blocks


async def _log_in(
    users: users_pb2_grpc.UserServiceAsyncStub, tracing: Tracing | None
) -> tuple[bool, users_pb2.LoginResponse, str]:
    """Create the demo user unless its email is taken, then log in: (created, Login's
    answer, trace id)."""
    with _root_span(tracing, USER_SPAN) as trace_id:
        created = True
        try:
            await users.CreateUser(
                users_pb2.CreateUserRequest(
                    email=DEMO_USER.email,
                    display_name=DEMO_USER.display_name,
                    password=DEMO_USER.password,
                    # Makes a retry of this very call safe; a rerun is told ALREADY_EXISTS.
                    idempotency_key=f"dev-stack-{uuid.uuid4().hex}",
                ),
                timeout=DEMO_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            created = False
        login: users_pb2.LoginResponse = await users.Login(
            users_pb2.LoginRequest(email=DEMO_USER.email, password=DEMO_USER.password),
            timeout=DEMO_CALL_TIMEOUT_S,
        )
    return created, login, trace_id


async def _notifications(
    notifications: notifications_pb2_grpc.NotificationServiceAsyncStub,
    user_id: str,
    order_ids: Sequence[str],
    logs: Sequence[Path],
) -> tuple[notifications_pb2.Notification, ...]:
    """The user's notifications about `order_ids`, once there is one for each (the orders'
    events travel orders' outbox -> NATS -> the notifications consumer); a StartupFailed
    when they do not come within NOTIFICATION_TIMEOUT_S."""

    async def about() -> dict[str, notifications_pb2.Notification]:
        page = await notifications.ListNotifications(
            notifications_pb2.ListNotificationsRequest(user_id=user_id, page_size=100),
            timeout=DEMO_CALL_TIMEOUT_S,
        )
        return {n.order_id: n for n in page.notifications if n.order_id in order_ids}

    found = await _eventually(about, order_ids, "notification", logs)
    return tuple(found[order_id] for order_id in order_ids)


async def _order_history(
    history: orderhistory_pb2_grpc.OrderHistoryServiceAsyncStub,
    user_id: str,
    placed: Sequence[orders_pb2.Order],
    logs: Sequence[Path],
) -> tuple[orderhistory_pb2.CustomerOrder, ...]:
    """The orders `placed` as the user's order history tells them, once it shows each in
    its outcome (or past it: a confirmed order goes on to delivery) with the items' names
    (orders', delivery's and the catalog's events -> order-history); a StartupFailed when it
    does not within NOTIFICATION_TIMEOUT_S."""
    outcome = {o.order_id: o.status for o in placed}

    async def about() -> dict[str, orderhistory_pb2.CustomerOrder]:
        page = await history.ListCustomerOrders(
            orderhistory_pb2.ListCustomerOrdersRequest(customer_id=user_id, page_size=100),
            timeout=DEMO_CALL_TIMEOUT_S,
        )
        return {
            o.order_id: o
            for o in page.orders
            if outcome.get(o.order_id) in {c.status for c in o.timeline}
            and all(i.name for i in o.items)
        }

    found = await _eventually(about, list(outcome), "order history entry", logs)
    return tuple(found[order_id] for order_id in outcome)


async def _eventually(
    about: Callable[[], Awaitable[dict[str, T]]],
    order_ids: Sequence[str],
    what: str,
    logs: Sequence[Path],
) -> dict[str, T]:
    """What `about` says of `order_ids`, once it says something of each (events are
    eventually consistent); a StartupFailed naming what is missing after
    NOTIFICATION_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + NOTIFICATION_TIMEOUT_S
    while True:
        found = await about()
        if len(found) == len(order_ids):
            return found
        if loop.time() > give_up:
            missing = ", ".join(o for o in order_ids if o not in found)
            raise StartupFailed(
                f"no {what} for order(s) {missing} after {NOTIFICATION_TIMEOUT_S:g}s", logs
            )
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class _Placing:
    """Places the demo user's orders on ``orders``; ``logs`` tell why one failed."""

    orders: orders_pb2_grpc.OrderServiceAsyncStub
    tracing: Tracing | None
    logs: Sequence[Path]
    customer_id: str

    async def place(
        self,
        payment_method: str,
        lines: Sequence[tuple[str, int]],
        *,
        expected: orders_pb2.OrderStatus.ValueType,
    ) -> PlacedOrder:
        """Place one order; a StartupFailed unless it ends ``expected``."""
        request = orders_pb2.PlaceOrderRequest(
            customer_id=self.customer_id,
            lines=[orders_pb2.OrderLine(item_id=item, quantity=n) for item, n in lines],
            idempotency_key=f"dev-stack-{uuid.uuid4().hex}",
            payment_method=payment_method,
            delivery_address=DEMO_ADDRESS,
        )
        what = f"the demo order paid with {payment_method}"
        with (
            _failing_as_startup(what, self.logs),
            _root_span(self.tracing, ORDER_SPAN) as trace_id,
        ):
            order: orders_pb2.Order = await self.orders.PlaceOrder(
                request, timeout=DEMO_CALL_TIMEOUT_S
            )
        if order.status != expected:
            reason = f": {order.rejection_reason}" if order.rejection_reason else ""
            raise StartupFailed(
                f"{what} is {status_name(order.status)}, not {status_name(expected)}{reason}",
                self.logs,
            )
        return PlacedOrder(order, trace_id)


@contextlib.contextmanager
def _root_span(tracing: Tracing | None, name: str) -> Iterator[str]:
    """One root span over the block, so that what it calls is one trace we can name; yields
    its trace id ("" when tracing is off)."""
    if tracing is None:
        yield ""
        return
    with tracing.tracer.start_as_current_span(name) as span:
        yield trace.format_trace_id(span.get_span_context().trace_id)


@contextlib.contextmanager
def _failing_as_startup(what: str, logs: Sequence[Path]) -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise StartupFailed(f"{what} failed: {exc.code().name}: {exc.details()}", logs) from exc


def _logs_of(logs: ServiceLogs, services: Sequence[str]) -> list[Path]:
    return [path for service in services for path in logs.get(service, ())]


def status_name(status: orders_pb2.OrderStatus.ValueType) -> str:
    return orders_pb2.OrderStatus.Name(status)


def show_demo(demo: Demo, receiver: ReceiverProcess | None) -> None:
    how = "created" if demo.created else "ALREADY_EXISTS: made by an earlier run"
    say(
        f"Demo user {DEMO_USER.email}: user_id {demo.user_id} ({how}; logged in: "
        f"{demo.login.token_type} token, expires in {demo.login.expires_in} s)"
    )
    if demo.user_trace_id:
        say(f"  trace {demo.user_trace_id}")
    for placed in (demo.confirmed, demo.rejected):
        show_order(placed, receiver)
    say("Notifications for the demo user (orders -> NATS JetStream -> notifications):")
    for notification in demo.notifications:
        kind = notifications_pb2.NotificationKind.Name(notification.kind)
        say(f"  {kind}: {notification.text}")
    say("Order history of the demo user (orders, delivery, catalog -> NATS -> order-history):")
    for entry in demo.history:
        items = ", ".join(f"{i.quantity} x {i.name}" for i in entry.items)
        steps = " -> ".join(
            status_name(c.status).removeprefix("ORDER_STATUS_") for c in entry.timeline
        )
        say(f"  {entry.order_id} at {entry.restaurant_name}: {items}; {steps}")


def show_order(placed: PlacedOrder, receiver: ReceiverProcess | None) -> None:
    order = placed.order
    lines = ", ".join(f"{line.quantity} x {line.item_id}" for line in order.lines)
    total = f"{order.total_cents // 100}.{order.total_cents % 100:02d} {order.currency}"
    say(
        f"Demo order through the mesh, paid with {order.payment_method}: order {order.order_id} "
        f"for {order.customer_id}: {lines}"
    )
    say(f"  total {total} (total_cents {order.total_cents}), to {order.delivery_address}")
    reason = json.dumps(order.rejection_reason) if order.rejection_reason else "(none)"
    say(f"  status {status_name(order.status)}, rejection_reason {reason}")
    say(f"  payment_id {order.payment_id or '(none)'}, delivery_id {order.delivery_id or '(none)'}")
    if placed.trace_id:
        say(f"  trace {placed.trace_id}")
    if placed.trace_id and receiver is not None:
        say(f"  {waterfall_command(receiver.store, '--trace', placed.trace_id)}")
