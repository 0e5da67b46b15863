"""What the platform's integration tests share: stubs on mesh channels to its services, the
checkout saga's invariant checked through the participants' own APIs, and a service's
Prometheus metrics read from the endpoint its Consul meta names."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

import mesh
from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from tests.integration.conftest import Stack

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
