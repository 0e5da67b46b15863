"""Events end to end, and the read models made of them: orders', delivery's and the catalog's
outboxes relayed to a real nats-server, consumed by two notifications instances and two
order-history instances (each pair sharing one durable consumer per stream and one database),
read back through NotificationService and OrderHistoryService; the order history rebuilt from
the streams into a fresh database answers the same. Counts come from the services' own APIs
and the broker's consumer state."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import mesh
from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from foodmesh.orderhistory.v1 import orderhistory_pb2, orderhistory_pb2_grpc
from foodmesh.orders.v1 import orders_pb2
from scripts.postgres_server import PostgresServer
from services.order_history.store import OrderHistoryStore
from tests.integration.conftest import LONG_TRIPS, PROJECT_ROOT, Stack, order, stack_under
from tests.integration.platform import (
    clients,
    history_of,
    in_history_exactly_once,
    notified_exactly_once,
    scrape,
    value,
)

Kind = notifications_pb2.NotificationKind
DECLINED = "pm_card_chargeDeclined"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """Consul, NATS, the platform with two orders instances, two notifications and two
    order-history instances."""
    with stack_under(tmp_path_factory.mktemp("read-models")) as stack:
        stack.start_nats()
        for _ in range(2):
            stack.start("notifications")
            stack.start("order-history")
        stack.start_platform(orders=2, delivery=LONG_TRIPS)
        stack.wait_passing("notifications", 2)
        stack.wait_passing("order-history", 2)
        yield stack, stack.customer()


async def test_each_checkout_makes_one_notification_and_one_history_entry_of_its_outcome(
    platform: tuple[Stack, str],
) -> None:
    stack, _ = platform
    customer = stack.customer(f"{uuid.uuid4().hex[:8]}@example.com")
    cards = ["pm_card_visa"] * 12 + [DECLINED] * 4
    async with clients(stack) as c:
        placed = await asyncio.gather(
            *(
                c.orders.PlaceOrder(
                    order(uuid.uuid4().hex, customer=customer, payment_method=card), timeout=30
                )
                for card in cards
            )
        )
        expected = {
            p.order_id: (
                Kind.NOTIFICATION_KIND_ORDER_CONFIRMED
                if p.status == orders_pb2.ORDER_STATUS_CONFIRMED
                else Kind.NOTIFICATION_KIND_ORDER_REJECTED
            )
            for p in placed
        }
        assert Counter(expected.values()) == {
            Kind.NOTIFICATION_KIND_ORDER_CONFIRMED: 12,
            Kind.NOTIFICATION_KIND_ORDER_REJECTED: 4,
        }
        found = await notified_exactly_once(stack, customer, placed)
    assert all(n.user_id == customer and n.text and n.notification_id for n in found)
    assert len({n.notification_id for n in found}) == len(found)
    rejected = [n for n in found if n.kind == Kind.NOTIFICATION_KIND_ORDER_REJECTED]
    assert all("generic_decline" in n.text for n in rejected)
    # The instances' own counts: each order's OrderPlaced and its outcome were applied.
    applied = [
        value(scrape(stack, "notifications", p.port), "foodmesh_events_processed_total",
              stream="ORDERS", consumer="notifications", outcome="applied")
        for p in stack.processes if p.name == "notifications"
    ]  # fmt: skip
    assert sum(applied) >= 2 * len(placed)  # each order's OrderPlaced and its outcome
    history = await in_history_exactly_once(stack, customer, placed)
    # Names come from the catalog's events, the courier from delivery's: never a call.
    assert {o.restaurant_name for o in history} == {"Trattoria Roma"}
    assert {i.name for o in history for i in o.items} == {"Margherita"}
    confirmed = [o for o in history if o.status == orders_pb2.ORDER_STATUS_CONFIRMED]
    assert all(o.courier_id and o.eta_time.seconds for o in confirmed)
    assert all(not o.rejection_reason for o in confirmed)
    rejected_orders = [o for o in history if o.status == orders_pb2.ORDER_STATUS_REJECTED]
    assert all("generic_decline" in o.rejection_reason for o in rejected_orders)
    by_id = {p.order_id: p for p in placed}
    assert all(o.total_cents == by_id[o.order_id].total_cents for o in history)
    assert [o.create_time.ToDatetime() for o in history] == sorted(
        (o.create_time.ToDatetime() for o in history), reverse=True
    )


async def test_a_renamed_item_shows_its_new_name_in_past_orders_and_a_rebuild_answers_the_same(
    platform: tuple[Stack, str],
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: PostgresServer,
) -> None:
    stack, _ = platform
    assert stack.nats is not None
    customer = stack.customer(f"{uuid.uuid4().hex[:8]}@example.com")
    async with (
        clients(stack) as c,
        mesh.channel("catalog", consul=stack.settings) as catalog_channel,
        mesh.channel("order-history", consul=stack.settings) as history_channel,
    ):
        placed = [
            await c.orders.PlaceOrder(
                order(uuid.uuid4().hex, customer=customer, item="sakura-miso-soup"), timeout=30
            ),
            await c.orders.PlaceOrder(
                order(uuid.uuid4().hex, customer=customer, payment_method=DECLINED), timeout=30
            ),
        ]
        await in_history_exactly_once(stack, customer, placed)
        catalog = catalog_pb2_grpc.CatalogServiceStub(catalog_channel)
        soup = await catalog.GetItem(catalog_pb2.GetItemRequest(item_id="sakura-miso-soup"))
        soup.name = f"Miso Soup {uuid.uuid4().hex[:4]}"
        assert (await catalog.PutItem(catalog_pb2.PutItemRequest(item=soup))).name == soup.name
        history = orderhistory_pb2_grpc.OrderHistoryServiceStub(history_channel)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        while soup.name not in {
            i.name for o in await history_of(history, customer) for i in o.items
        }:
            assert loop.time() < give_up, "the renamed item never reached the order history"
            await asyncio.sleep(0.1)
        live = await history_of(history, customer)
    rebuilt = tmp_path_factory.mktemp("rebuilt")
    done = await rebuild(stack, rebuilt)
    assert done.returncode == 0, done.stderr
    assert "events applied" in done.stdout, done.stdout
    async with await OrderHistoryStore.open(rebuilt / "order-history.db") as store:
        page = await store.page(customer, "", 1000)
    assert page.orders == live
    assert [i.name for i in live[-1].items] == [soup.name]  # the first order, oldest last
    again = await rebuild(stack, rebuilt)
    assert again.returncode == 2 and "fresh database" in again.stderr
    # The same into a Postgres database: the streams are the source, whatever the engine.
    url = postgres_server.fresh_database("order-history")
    done = await rebuild(stack, url)
    assert done.returncode == 0, done.stderr
    async with await OrderHistoryStore.open(url) as store:
        assert (await store.page(customer, "", 1000)).orders == live
    again = await rebuild(stack, url)
    assert again.returncode == 2 and "fresh database" in again.stderr


async def test_a_watch_sends_what_there_is_then_each_new_notification(
    platform: tuple[Stack, str],
) -> None:
    stack, _ = platform
    customer = stack.customer(f"{uuid.uuid4().hex[:8]}@example.com")
    async with (
        clients(stack) as c,
        mesh.channel("notifications", consul=stack.settings) as channel,
    ):
        stub = notifications_pb2_grpc.NotificationServiceStub(channel)
        first = await c.orders.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=30)
        watch = stub.WatchNotifications(
            notifications_pb2.WatchNotificationsRequest(user_id=customer), timeout=30
        )
        seen = [await watch.read()]
        assert seen[0].order_id == first.order_id
        second = await c.orders.PlaceOrder(
            order(uuid.uuid4().hex, customer=customer, payment_method=DECLINED), timeout=30
        )
        seen.append(await watch.read())
        watch.cancel()
    assert [(n.order_id, n.kind) for n in seen] == [
        (first.order_id, Kind.NOTIFICATION_KIND_ORDER_CONFIRMED),
        (second.order_id, Kind.NOTIFICATION_KIND_ORDER_REJECTED),
    ]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (notifications_pb2.ListNotificationsRequest(user_id=""), "user_id"),
        (notifications_pb2.ListNotificationsRequest(user_id="u", page_size=-1), "page_size"),
        (notifications_pb2.ListNotificationsRequest(user_id="u", page_token="%%%"), "page_token"),
    ],
)
async def test_bad_list_notifications_requests_are_invalid_argument_naming_the_field(
    platform: tuple[Stack, str], request_: notifications_pb2.ListNotificationsRequest, field: str
) -> None:
    stack, _ = platform
    async with mesh.channel("notifications", consul=stack.settings) as channel:
        stub = notifications_pb2_grpc.NotificationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListNotifications(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")


async def rebuild(stack: Stack, into: Path | str) -> subprocess.CompletedProcess[str]:
    """`python -m services.order_history.rebuild` into a data directory (or a Postgres
    database's URL), from the stack's NATS."""
    assert stack.nats is not None
    where = ["--data-dir", str(into)] if isinstance(into, Path) else ["--database-url", into]
    command = [
        sys.executable, "-m", "services.order_history.rebuild", *where,
        "--nats-url", stack.nats.url,
    ]  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run, command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (orderhistory_pb2.ListCustomerOrdersRequest(customer_id=""), "customer_id"),
        (orderhistory_pb2.ListCustomerOrdersRequest(customer_id="c", page_size=-1), "page_size"),
        (orderhistory_pb2.ListCustomerOrdersRequest(customer_id="c", page_token="x"), "page_token"),
    ],
)
async def test_bad_list_customer_orders_requests_are_invalid_argument_naming_the_field(
    platform: tuple[Stack, str], request_: orderhistory_pb2.ListCustomerOrdersRequest, field: str
) -> None:
    stack, _ = platform
    async with mesh.channel("order-history", consul=stack.settings) as channel:
        stub = orderhistory_pb2_grpc.OrderHistoryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListCustomerOrders(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "item.name"),
        ({"price_cents": -1}, grpc.StatusCode.INVALID_ARGUMENT, "item.price_cents"),
        ({"currency": "euro"}, grpc.StatusCode.INVALID_ARGUMENT, "item.currency"),
        ({"restaurant_id": "nowhere"}, grpc.StatusCode.NOT_FOUND, "item.restaurant_id"),
        ({"restaurant_id": "green-bowl"}, grpc.StatusCode.FAILED_PRECONDITION, "item.item_id"),
    ],
)
async def test_a_bad_put_item_names_the_field_and_changes_nothing(
    platform: tuple[Stack, str], change: dict[str, object], code: grpc.StatusCode, field: str
) -> None:
    stack, _ = platform
    async with mesh.channel("catalog", consul=stack.settings) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        before = await catalog.GetItem(catalog_pb2.GetItemRequest(item_id="roma-tiramisu"))
        bad = catalog_pb2.Item()
        bad.CopyFrom(before)
        for name, new in change.items():
            setattr(bad, name, new)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await catalog.PutItem(catalog_pb2.PutItemRequest(item=bad))
        after = await catalog.GetItem(catalog_pb2.GetItemRequest(item_id="roma-tiramisu"))
    assert raised.value.code() == code
    assert field in (raised.value.details() or "")
    assert after == before
