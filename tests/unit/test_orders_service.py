"""OrderService on a real in-process grpc.aio server, pricing orders through a real catalog
server on a plain channel, as it does through the mesh in production."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.testing import InProcessServer, MockChannel
from meshkit.storage.sqlite import SqliteDatabase
from services.datadir import database_path
from services.orders.servicer import DEFAULT_CATALOG_TIMEOUT_S, OrderServicer
from services.orders.store import (
    IdempotencyKey,
    NewOrder,
    OrderLine,
    OrdersStore,
)
from tests.unit.demo_services import (
    AVAILABLE_ITEM_ID,
    UNAVAILABLE_ITEM_ID,
    catalog_server,
    count_rows,
    rpc_error,
)

if TYPE_CHECKING:
    from foodmesh.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub
    from foodmesh.orders.v1.orders_pb2_grpc import OrderServiceAsyncStub as OrdersStub

MARGHERITA, CARBONARA = AVAILABLE_ITEM_ID, "roma-carbonara"  # 850 and 1250 EUR cents
SUSHI = "sakura-miso-soup"
ORDER_TABLES = ("orders", "order_lines", "idempotency_keys")


def line(item_id: str, quantity: int = 1, unit_price_cents: int = 0) -> orders_pb2.OrderLine:
    return orders_pb2.OrderLine(
        item_id=item_id, quantity=quantity, unit_price_cents=unit_price_cents
    )


def order_request(*lines: orders_pb2.OrderLine, key: str = "") -> orders_pb2.PlaceOrderRequest:
    return orders_pb2.PlaceOrderRequest(
        customer_id="alice", lines=list(lines) or [line(MARGHERITA)], idempotency_key=key
    )


@asynccontextmanager
async def orders_server(
    db_path: Path, catalog: CatalogServiceAsyncStub
) -> AsyncIterator[OrdersStub]:
    """An orders service on db_path pricing through catalog; yields a stub that calls it."""
    async with await OrdersStore.open(db_path) as store:
        add = orders_pb2_grpc.add_OrderServiceServicer_to_server
        async with InProcessServer((add, OrderServicer(catalog, store))) as server:
            yield orders_pb2_grpc.OrderServiceStub(server.channel)


@dataclass
class Platform:
    """A catalog server and an orders server on their own database files."""

    catalog_db: Path
    orders_db: Path
    catalog_channel: grpc.aio.Channel
    orders: OrdersStub
    stop_catalog: AsyncExitStack

    async def stored_rows(self) -> dict[str, int]:
        return {table: await count_rows(self.orders_db, table) for table in ORDER_TABLES}

    async def set_catalog_item(self, item_id: str, column: str, value: object) -> None:
        """Change an item as an operator would: in the catalog's file, from outside."""
        async with await SqliteDatabase.open(self.catalog_db) as database:
            async with database.transaction() as transaction:
                changed = await transaction.execute(
                    f"UPDATE items SET {column} = ? WHERE item_id = ?", (value, item_id)
                )
        assert changed == 1


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    data_dir = tmp_path / "data"
    catalog_db, orders_db = database_path(data_dir, "catalog"), database_path(data_dir, "orders")
    async with AsyncExitStack() as stack, AsyncExitStack() as catalog_stack:
        server = await catalog_stack.enter_async_context(catalog_server(catalog_db))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        orders = await stack.enter_async_context(orders_server(orders_db, catalog))
        yield Platform(catalog_db, orders_db, channel, orders, catalog_stack)


NOTHING_STORED = dict.fromkeys(ORDER_TABLES, 0)


async def test_place_order_prices_lines_from_the_catalog(platform: Platform) -> None:
    order = await platform.orders.PlaceOrder(
        order_request(line(MARGHERITA, 2), line(CARBONARA, 1, unit_price_cents=1250))
    )
    assert order.order_id
    assert order.customer_id == "alice"
    assert order.restaurant_id == "trattoria-roma"
    assert [(ln.item_id, ln.quantity, ln.unit_price_cents) for ln in order.lines] == [
        (MARGHERITA, 2, 850),
        (CARBONARA, 1, 1250),
    ]
    assert order.total_cents == 2 * 850 + 1250
    assert order.currency == "EUR"
    assert order.status == orders_pb2.ORDER_STATUS_PLACED
    assert order.HasField("create_time")
    assert order.create_time.seconds > 0

    fetched = await platform.orders.GetOrder(orders_pb2.GetOrderRequest(order_id=order.order_id))
    assert fetched == order
    assert await platform.stored_rows() == {"orders": 1, "order_lines": 2, "idempotency_keys": 0}


async def test_next_order_takes_a_changed_catalog_price(platform: Platform) -> None:
    before = await platform.orders.PlaceOrder(order_request())
    await platform.set_catalog_item(MARGHERITA, "price_cents", 990)
    after = await platform.orders.PlaceOrder(order_request())
    assert before.total_cents == 850
    assert after.lines[0].unit_price_cents == 990
    assert after.total_cents == 990


LONG_KEY = "k" * 256
INVALID_REQUESTS = {
    "customer_id": orders_pb2.PlaceOrderRequest(lines=[line(MARGHERITA)]),
    "lines must not be empty": orders_pb2.PlaceOrderRequest(customer_id="alice"),
    "lines has 101": order_request(*(line(f"item-{n}") for n in range(101))),
    "idempotency_key": order_request(key=LONG_KEY),
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
async def test_invalid_request_is_refused_before_calling_the_catalog(
    platform: Platform, field: str
) -> None:
    await platform.stop_catalog.aclose()  # any catalog call would now fail with UNAVAILABLE
    error = await rpc_error(platform.orders.PlaceOrder(INVALID_REQUESTS[field]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_unknown_item_is_not_found_naming_line_and_item(platform: Platform) -> None:
    error = await rpc_error(
        platform.orders.PlaceOrder(order_request(line(MARGHERITA), line("no-such-dish")))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "lines[1].item_id 'no-such-dish'" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_unavailable_item_is_failed_precondition(platform: Platform) -> None:
    error = await rpc_error(platform.orders.PlaceOrder(order_request(line(UNAVAILABLE_ITEM_ID))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert UNAVAILABLE_ITEM_ID in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_stale_price_is_failed_precondition_naming_both_prices(platform: Platform) -> None:
    error = await rpc_error(platform.orders.PlaceOrder(order_request(line(MARGHERITA, 1, 800))))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert MARGHERITA in details
    assert "800" in details
    assert "850" in details
    assert await platform.stored_rows() == NOTHING_STORED


async def test_items_of_two_restaurants_are_failed_precondition(platform: Platform) -> None:
    error = await rpc_error(
        platform.orders.PlaceOrder(order_request(line(MARGHERITA), line(SUSHI)))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert SUSHI in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_items_in_two_currencies_are_failed_precondition(platform: Platform) -> None:
    await platform.set_catalog_item(CARBONARA, "currency", "CHF")
    error = await rpc_error(
        platform.orders.PlaceOrder(order_request(line(MARGHERITA), line(CARBONARA)))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CHF" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_total_beyond_int64_is_out_of_range(platform: Platform) -> None:
    await platform.set_catalog_item(MARGHERITA, "price_cents", 2**62)
    error = await rpc_error(platform.orders.PlaceOrder(order_request(line(MARGHERITA, 2))))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "total" in (error.details() or "")
    assert await platform.stored_rows() == NOTHING_STORED


async def test_catalog_down_is_unavailable_and_stores_nothing(platform: Platform) -> None:
    await platform.stop_catalog.aclose()
    error = await rpc_error(platform.orders.PlaceOrder(order_request()))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "catalog service failed" in (error.details() or "")
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

    async def ListItems(
        self,
        request: catalog_pb2.ListItemsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> catalog_pb2.ListItemsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


@asynccontextmanager
async def orders_on_scripted_catalog(
    tmp_path: Path, catalog: ScriptedCatalog
) -> AsyncIterator[OrdersStub]:
    """Orders in front of a scripted catalog that no server serves: a MockChannel answers."""
    channel = MockChannel((catalog_pb2_grpc.add_CatalogServiceServicer_to_server, catalog))
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    async with orders_server(tmp_path / "orders.db", stub) as orders:
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
    tmp_path: Path, catalog_code: grpc.StatusCode, expected_code: grpc.StatusCode
) -> None:
    async with orders_on_scripted_catalog(tmp_path, ScriptedCatalog(catalog_code)) as orders:
        error = await rpc_error(orders.PlaceOrder(order_request(), timeout=30))
    assert error.code() == expected_code
    assert "catalog service failed" in (error.details() or "")
    assert await count_rows(tmp_path / "orders.db", "orders") == 0


async def test_catalog_call_gets_the_inbound_remaining_time(tmp_path: Path) -> None:
    catalog = ScriptedCatalog(grpc.StatusCode.UNAVAILABLE)
    async with orders_on_scripted_catalog(tmp_path, catalog) as orders:
        await rpc_error(orders.PlaceOrder(order_request(), timeout=30))
        await rpc_error(orders.PlaceOrder(order_request()))
    with_deadline, without_deadline = catalog.time_remaining
    assert with_deadline is not None and 0 < with_deadline <= 30 + 0.5
    assert without_deadline is not None and 0 < without_deadline <= DEFAULT_CATALOG_TIMEOUT_S + 0.5


async def test_same_key_and_request_returns_the_first_order(platform: Platform) -> None:
    first = await platform.orders.PlaceOrder(order_request(key="key-1"))
    await platform.set_catalog_item(MARGHERITA, "available", 0)
    retry = await platform.orders.PlaceOrder(order_request(key="key-1"))
    assert retry == first
    assert await platform.stored_rows() == {"orders": 1, "order_lines": 1, "idempotency_keys": 1}


async def test_retry_is_answered_even_while_the_catalog_is_down(platform: Platform) -> None:
    first = await platform.orders.PlaceOrder(order_request(key="key-1"))
    await platform.stop_catalog.aclose()
    retry = await platform.orders.PlaceOrder(order_request(key="key-1"))
    assert retry.order_id == first.order_id


@pytest.mark.parametrize(
    "other_request",
    [
        order_request(line(MARGHERITA, 2), key="key-1"),
        order_request(line(CARBONARA), key="key-1"),
        order_request(line(MARGHERITA, 1, 850), key="key-1"),
        orders_pb2.PlaceOrderRequest(
            customer_id="bob", lines=[line(MARGHERITA)], idempotency_key="key-1"
        ),
    ],
)
async def test_same_key_with_another_request_is_already_exists(
    platform: Platform, other_request: orders_pb2.PlaceOrderRequest
) -> None:
    await platform.orders.PlaceOrder(order_request(key="key-1"))
    error = await rpc_error(platform.orders.PlaceOrder(other_request))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'key-1'" in (error.details() or "")
    assert await platform.stored_rows() == {"orders": 1, "order_lines": 1, "idempotency_keys": 1}


async def test_empty_key_does_not_deduplicate(platform: Platform) -> None:
    first = await platform.orders.PlaceOrder(order_request())
    second = await platform.orders.PlaceOrder(order_request())
    assert first.order_id != second.order_id
    assert await platform.stored_rows() == {"orders": 2, "order_lines": 2, "idempotency_keys": 0}


async def test_concurrent_duplicates_on_two_servers_create_one_order(platform: Platform) -> None:
    catalog = catalog_pb2_grpc.CatalogServiceStub(platform.catalog_channel)
    async with orders_server(platform.orders_db, catalog) as second_instance:
        instances = (platform.orders, second_instance)
        orders = await asyncio.gather(
            *(instances[n % 2].PlaceOrder(order_request(key="dup")) for n in range(16))
        )
    assert len({order.order_id for order in orders}) == 1
    assert await platform.stored_rows() == {"orders": 1, "order_lines": 1, "idempotency_keys": 1}


async def test_concurrent_place_on_two_stores_of_one_file_creates_one_order(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "orders.db"
    lines = (OrderLine(MARGHERITA, 1, 0),)
    key = IdempotencyKey.for_request("dup", "alice", lines)
    new_order = NewOrder("alice", "trattoria-roma", "EUR", (OrderLine(MARGHERITA, 1, 850),))
    first, second = await asyncio.gather(OrdersStore.open(db_path), OrdersStore.open(db_path))
    async with first, second:
        placed = await asyncio.gather(
            *((first, second)[n % 2].place(new_order, key) for n in range(20))
        )
    assert sum(result.created for result in placed) == 1
    assert len({result.order.order_id for result in placed}) == 1
    assert await count_rows(db_path, "orders") == 1


async def test_get_order_without_order_id_is_invalid_argument(platform: Platform) -> None:
    error = await rpc_error(platform.orders.GetOrder(orders_pb2.GetOrderRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "order_id" in (error.details() or "")


async def test_get_unknown_order_is_not_found_naming_it(platform: Platform) -> None:
    error = await rpc_error(
        platform.orders.GetOrder(orders_pb2.GetOrderRequest(order_id="no-such-order"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-order" in (error.details() or "")
