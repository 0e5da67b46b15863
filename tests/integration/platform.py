"""What the platform's integration tests share: stubs on mesh channels to its services, the
checkout saga's invariant checked through the participants' own APIs, the notifications and
the order history of orders counted through NotificationService, OrderHistoryService and the
broker's consumer state, and a service's
Prometheus metrics read from the endpoint its Consul meta names."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
import nats
from prometheus_client.parser import text_string_to_metric_families

import mesh
from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from foodmesh.orderhistory.v1 import orderhistory_pb2, orderhistory_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from mesh.telemetry.rpc_metrics import Side, rpc_labels
from tests.integration.conftest import Stack, order
from tests.paging import all_pages

Status = orders_pb2.OrderStatus
PAYMENT = payments_pb2.PaymentStatus
DELIVERY = delivery_pb2.DeliveryStatus
ACTIVE_DELIVERY = (delivery_pb2.DELIVERY_STATUS_ASSIGNED, delivery_pb2.DELIVERY_STATUS_PICKED_UP)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Clients:
    """Stubs on mesh channels to the platform's services."""

    orders: orders_pb2_grpc.OrderServiceAsyncStub
    payments: payments_pb2_grpc.PaymentServiceAsyncStub
    delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub

    async def effects(
        self, order_id: str
    ) -> tuple[list[payments_pb2.Payment], list[delivery_pb2.Delivery]]:
        """What payments and delivery hold for the order, as they say."""
        payments = await self.payments.ListPayments(
            payments_pb2.ListPaymentsRequest(order_id=order_id)
        )
        deliveries = await self.delivery.ListDeliveries(
            delivery_pb2.ListDeliveriesRequest(order_id=order_id)
        )
        return list(payments.payments), list(deliveries.deliveries)

    async def invariant_holds(self, order_id: str) -> orders_pb2.Order:
        """The order, after checking the saga's invariant on it through payments and
        delivery."""
        found = await self.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order_id))
        payments, deliveries = await self.effects(order_id)
        paid = [PAYMENT.Name(p.status) for p in payments]
        sent = [DELIVERY.Name(d.status) for d in deliveries]
        status = Status.Name(found.status)
        if found.status in (
            orders_pb2.ORDER_STATUS_CONFIRMED,
            orders_pb2.ORDER_STATUS_OUT_FOR_DELIVERY,
            orders_pb2.ORDER_STATUS_DELIVERED,
        ):
            assert paid.count("PAYMENT_STATUS_CAPTURED") == 1, (status, paid)
            assert not {"PAYMENT_STATUS_AUTHORIZED"} & set(paid), (status, paid)
            assert len([s for s in sent if s != "DELIVERY_STATUS_CANCELLED"]) == 1, (status, sent)
        elif found.status in (orders_pb2.ORDER_STATUS_REJECTED, orders_pb2.ORDER_STATUS_CANCELLED):
            assert not {"PAYMENT_STATUS_AUTHORIZED", "PAYMENT_STATUS_CAPTURED"} & set(paid), (
                status,
                paid,
            )
            active = [d for d in deliveries if d.status in ACTIVE_DELIVERY]
            assert not active, (status, sent)
        else:
            raise AssertionError(f"order {order_id} is {status}, not final or confirmed")
        return found


@asynccontextmanager
async def clients(stack: Stack) -> AsyncIterator[Clients]:
    async with (
        mesh.channel("orders", consul=stack.settings) as orders,
        mesh.channel("payments", consul=stack.settings) as payments,
        mesh.channel("delivery", consul=stack.settings) as delivery,
    ):
        yield Clients(
            orders_pb2_grpc.OrderServiceStub(orders),
            payments_pb2_grpc.PaymentServiceStub(payments),
            delivery_pb2_grpc.DeliveryServiceStub(delivery),
        )


def scrape(stack: Stack, service: str, port: int | None = None) -> Samples:
    """The metrics of the service's one passing instance (or of the one on `port`)."""
    (entry,) = [e for e in stack.passing(service) if port in (None, e["Service"]["Port"])]
    port = int(entry["Service"]["Meta"]["metrics_port"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, side: Side, service: str, method: str, code: str = "OK") -> float:
    """grpc_<side>_handled_total of a unary `method` of `service`; `code` in Go's spelling."""
    labels = rpc_labels(service, method)
    return value(samples, f"grpc_{side}_handled_total", grpc_code=code, **labels)


Kind = notifications_pb2.NotificationKind
OUTCOME_KIND = {
    orders_pb2.ORDER_STATUS_CONFIRMED: Kind.NOTIFICATION_KIND_ORDER_CONFIRMED,
    orders_pb2.ORDER_STATUS_REJECTED: Kind.NOTIFICATION_KIND_ORDER_REJECTED,
}
"""The notification a checkout's outcome makes."""


async def notifications_of(
    stub: notifications_pb2_grpc.NotificationServiceAsyncStub, user_id: str
) -> list[notifications_pb2.Notification]:
    """All of the user's notifications, newest first, page by page."""

    async def page(token: str) -> tuple[Sequence[notifications_pb2.Notification], str]:
        answer = await stub.ListNotifications(
            notifications_pb2.ListNotificationsRequest(
                user_id=user_id, page_size=7, page_token=token
            )
        )
        return answer.notifications, answer.next_page_token

    return await all_pages(page)


async def consumer_drained(
    stack: Stack, stream: str = "ORDERS", consumer: str = "notifications"
) -> bool:
    """Whether the broker has delivered and seen acked every message of the stream to the
    durable consumer: nothing is left that could still make an effect."""
    assert stack.nats is not None
    client = await nats.connect(stack.nats.url.split(","))  # a cluster: every node
    try:
        info = await client.jetstream().consumer_info(stream, consumer)
        return info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await client.close()


async def notified_exactly_once(
    stack: Stack, user_id: str, outcomes: Iterable[orders_pb2.Order], timeout: float = 60.0
) -> list[notifications_pb2.Notification]:
    """The user's notifications, once there is one per order and the consumer is drained;
    asserts that each order has exactly the one notification of its outcome, none doubled,
    none missing."""
    expected = Counter((o.order_id, OUTCOME_KIND[o.status]) for o in outcomes)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    async with mesh.channel("notifications", consul=stack.settings) as channel:
        stub = notifications_pb2_grpc.NotificationServiceStub(channel)
        while True:
            found = await notifications_of(stub, user_id)
            if len(found) >= sum(expected.values()) and await consumer_drained(stack):
                break
            assert loop.time() < give_up, f"{len(found)} of {sum(expected.values())} notified"
            await asyncio.sleep(0.1)
        found = await notifications_of(stub, user_id)  # after the drain: the final count
    notified = Counter((n.order_id, n.kind) for n in found)
    assert notified == expected, (
        f"doubled or unexpected: {notified - expected}, missing: {expected - notified}"
    )
    return found


async def history_of(
    stub: orderhistory_pb2_grpc.OrderHistoryServiceAsyncStub, customer_id: str
) -> list[orderhistory_pb2.CustomerOrder]:
    """All of the customer's orders in the order history, newest first, page by page."""

    async def page(token: str) -> tuple[Sequence[orderhistory_pb2.CustomerOrder], str]:
        answer = await stub.ListCustomerOrders(
            orderhistory_pb2.ListCustomerOrdersRequest(
                customer_id=customer_id, page_size=5, page_token=token
            )
        )
        return answer.orders, answer.next_page_token

    return await all_pages(page)


async def in_history_exactly_once(
    stack: Stack, customer_id: str, outcomes: Iterable[orders_pb2.Order], timeout: float = 60.0
) -> list[orderhistory_pb2.CustomerOrder]:
    """The customer's order history, once it shows every order in its outcome and the
    order-history consumers are drained; asserts one entry per order, none doubled, none
    missing, each with the outcome's status and a timeline from PENDING to it."""
    expected = {o.order_id: o.status for o in outcomes}
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    async with mesh.channel("order-history", consul=stack.settings) as channel:
        stub = orderhistory_pb2_grpc.OrderHistoryServiceStub(channel)
        while True:
            found = await history_of(stub, customer_id)
            shown = {o.order_id: o.status for o in found}
            if all(shown.get(k) == v for k, v in expected.items()) and all(
                [await consumer_drained(stack, s, "order-history") for s in ("ORDERS", "DELIVERY")]
            ):
                break
            assert loop.time() < give_up, f"{len(shown)} of {len(expected)} in the history"
            await asyncio.sleep(0.1)
        found = await history_of(stub, customer_id)  # after the drain: the final count
    listed, wanted = Counter(o.order_id for o in found), Counter(expected.keys())
    assert listed == wanted, f"doubled or unexpected: {listed - wanted}, missing: {wanted - listed}"
    for entry in found:
        statuses = [change.status for change in entry.timeline]
        assert statuses[0] == Status.ORDER_STATUS_PENDING, entry
        assert statuses[-1] == entry.status == expected[entry.order_id], entry
    return found


FINAL = (orders_pb2.ORDER_STATUS_CONFIRMED, orders_pb2.ORDER_STATUS_REJECTED)


@dataclass
class CheckoutLoad:
    """Checkouts placed in a loop by a few callers, each retried with its own key until it
    is answered; every failed attempt kept with the time it came."""

    customer: str
    keys: list[str] = field(default_factory=list)
    answers: dict[str, orders_pb2.Order] = field(default_factory=dict)
    failures: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def caller(self, stub: orders_pb2_grpc.OrderServiceAsyncStub) -> None:
        while not self.stopping.is_set():
            key = uuid.uuid4().hex
            self.keys.append(key)
            while True:  # the same key until answered: the checkout happens once
                try:
                    answer = await stub.PlaceOrder(order(key, customer=self.customer), timeout=15)
                except grpc.aio.AioRpcError as error:
                    self.failures.append((time.monotonic(), error.code(), error.details() or ""))
                    await asyncio.sleep(0.2)
                    continue
                self.answers[key] = answer
                break


async def final_order(
    stub: orders_pb2_grpc.OrderServiceAsyncStub, order_id: str
) -> orders_pb2.Order:
    """The order once its saga has ended (a saga cut short by the crash resumes by itself)."""
    give_up = time.monotonic() + 60
    while True:
        found = await stub.GetOrder(orders_pb2.GetOrderRequest(order_id=order_id), timeout=10)
        if found.status in FINAL:
            return found
        assert time.monotonic() < give_up, f"order {order_id} still {found.status}"
        await asyncio.sleep(0.2)


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
