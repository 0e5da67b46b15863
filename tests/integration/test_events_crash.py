"""Events across crashes, each case counted through the services' own APIs: every checkout
makes exactly one notification of its outcome and one order-history entry in it, none
doubled, none missing.

- The broker SIGKILLed while events flow, then restarted on the same store; then the broker
  stopped for 10 s while checkouts go on (they keep working; the backlog grows, then drains).
- An orders instance SIGKILLed between a PubAck and the move of its relay's cursor (the
  other instance takes the relay over and publishes those events again: JetStream drops the
  copies), and the notifications instance SIGKILLed between an effect's commit and its ack
  (the message comes again: the inbox drops it).

Two stacks, one per pair of cases, each a real nats-server, Consul and service processes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from foodmesh.orders.v1 import orders_pb2
from scripts.processes import wait_until
from tests.integration.conftest import LONG_TRIPS, ServiceProcess, Stack, order, stack_under
from tests.integration.platform import (
    Clients,
    clients,
    in_history_exactly_once,
    notified_exactly_once,
    scrape,
    value,
)

SETTLED = (orders_pb2.ORDER_STATUS_CONFIRMED, orders_pb2.ORDER_STATUS_REJECTED)


@pytest.fixture
def stack_with_nats(tmp_path: Path) -> Iterator[Stack]:
    with stack_under(tmp_path) as stack:
        stack.start_nats()
        yield stack


async def checkout(c: Clients, customer: str, card: str = "pm_card_visa") -> orders_pb2.Order:
    """One order, placed until it has an answer: a call that an instance's death failed is
    sent again with the same idempotency key (the customer's retry), which finds the order."""
    request = order(uuid.uuid4().hex, customer=customer, payment_method=card)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 60
    while True:
        try:
            placed = await c.orders.PlaceOrder(request, timeout=10)
            if placed.status in SETTLED:
                return placed
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        assert loop.time() < give_up, f"order {request.idempotency_key} never settled"
        await asyncio.sleep(0.2)


def cards(n: int) -> list[str]:
    """Mostly cards that work, every fourth declined: both outcomes are counted."""
    return ["pm_card_chargeDeclined" if k % 4 == 3 else "pm_card_visa" for k in range(n)]


async def test_the_broker_killed_or_stopped_loses_and_doubles_no_event(
    stack_with_nats: Stack,
) -> None:
    stack = stack_with_nats
    assert stack.nats is not None
    stack.start("notifications")
    stack.start("order-history")
    stack.start_platform(orders=2, delivery=LONG_TRIPS)
    stack.wait_passing("notifications", 1)
    stack.wait_passing("order-history", 1)
    customer = stack.customer()
    placed: list[orders_pb2.Order] = []
    async with clients(stack) as c:
        # SIGKILL mid-stream: checkouts in flight while it dies and comes back on its store.
        flowing = asyncio.gather(*(checkout(c, customer, card) for card in cards(12)))
        await asyncio.sleep(0.3)
        stack.nats.kill()
        await asyncio.sleep(1.0)
        stack.nats.start()
        placed += await flowing

        # Stopped for 10 s: checkout goes on without it, and the outbox keeps what it must.
        stack.nats.stop()
        loop = asyncio.get_running_loop()
        back_at = loop.time() + 10
        during = []
        for card in cards(8):
            during.append(await checkout(c, customer, card))
            await asyncio.sleep(max(0.0, (back_at - loop.time()) / 10))
        assert all(p.status in SETTLED for p in during)
        backlog = sum(
            value(scrape(stack, "orders", p.port), "foodmesh_outbox_backlog", context="orders")
            for p in stack.processes
            if p.name == "orders"
        )
        assert backlog > 0, "the outbox of the leading relay shows no backlog"
        await asyncio.sleep(max(0.0, back_at - loop.time()))
        stack.nats.start()
        placed += during
    assert len(placed) == 20
    await notified_exactly_once(stack, customer, placed)
    await in_history_exactly_once(stack, customer, placed)


def relay_leader(stack: Stack) -> ServiceProcess | None:
    for p in stack.processes:
        if p.name == "orders" and p.proc.poll() is None:
            samples = scrape(stack, "orders", p.port)
            if value(samples, "foodmesh_outbox_relay_leader", context="orders") == 1:
                return p
    return None


async def test_a_relay_killed_after_publishing_and_a_consumer_killed_before_acking_double_nothing(
    stack_with_nats: Stack,
) -> None:
    stack = stack_with_nats
    crash_after_publish = {"FOODMESH_EVENTS_CRASH_AT": "after-publish:7"}
    crash_before_ack = {"FOODMESH_EVENTS_CRASH_AT": "before-ack:5"}
    notifications = stack.start("notifications", "--events-ack-wait", "1", env=crash_before_ack)
    stack.start("order-history")
    stack.start_platform(orders=0, delivery=LONG_TRIPS, orders_args=("--lease-seconds", "1"))
    doomed = stack.start("orders", "--lease-seconds", "1", env=crash_after_publish)
    stack.wait_passing("orders", {doomed.port})
    wait_until(lambda: relay_leader(stack) is doomed, timeout=20, message="the doomed relay leads")
    survivor = stack.start("orders", "--lease-seconds", "1")
    stack.wait_passing("orders", 2)
    stack.wait_passing("notifications", 1)
    customer = stack.customer()
    async with clients(stack) as c:
        placed = [await checkout(c, customer, card) for card in cards(8)]
        # The doomed instance died at its 7th PubAck (the second order's events), with its
        # cursor behind; the consumer died after its 5th effect, not acked.
        assert doomed.proc.wait(timeout=30) == -9, doomed.log()[-2000:]
        assert notifications.proc.wait(timeout=30) == -9, notifications.log()[-2000:]
        doomed.stopped = notifications.stopped = True
        restarted = stack.start("notifications", "--events-ack-wait", "1")
        stack.wait_passing("notifications", {restarted.port})
        found = await notified_exactly_once(stack, customer, placed)
        await in_history_exactly_once(stack, customer, placed)
    assert len(found) == 8
    survivor_samples = scrape(stack, "orders", survivor.port)
    republished = value(
        survivor_samples, "foodmesh_events_publish_duplicates_total", context="orders"
    )
    assert republished >= 1, "the survivor republished nothing the doomed relay had published"
    redelivered = value(
        scrape(stack, "notifications", restarted.port),
        "foodmesh_events_processed_total",
        stream="ORDERS",
        consumer="notifications",
        outcome="duplicate",
    )
    assert redelivered >= 1, "the effect whose ack was lost was not seen again"
    assert "after-publish:7 reached" in doomed.log()
    assert "before-ack:5 reached" in notifications.log()
