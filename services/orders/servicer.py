"""foodmesh.orders.v1.OrderService: places orders at the catalog's current prices.

The order of work is the point. Everything the request alone can show wrong is refused first,
before any call or write. A retry with a used idempotency key is answered from the store
without asking the catalog (the item may have sold out since; the order exists all the same).
Prices and availability are then read from the catalog service through its stub, all lines at
once, with the inbound call's remaining time as the timeout: never from a local copy, because
the catalog's instances own the prices. Only then is the order written, in one transaction.

Failures of the catalog keep their code (UNAVAILABLE, DEADLINE_EXCEEDED, ...) and say that
the catalog failed, so callers and the mesh's retry policy can tell a dependency outage from
a bug (INTERNAL). A line that repeats an earlier line's item is refused rather than merged:
merging would make the stored lines differ from the request the caller sees echoed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from services.orders.store import (
    IdempotencyConflict,
    IdempotencyKey,
    NewOrder,
    OrderLine,
    OrdersStore,
    OrderTotalOutOfRange,
    StoredOrder,
)

MAX_LINES = 100
MAX_QUANTITY = 1000
MAX_IDEMPOTENCY_KEY_LENGTH = 255
DEFAULT_CATALOG_TIMEOUT_S = 5.0

# Catalog failures whose code the caller gets unchanged; any other catalog error becomes
# UNAVAILABLE, since the caller's request was valid and the fault lies with the dependency.
_PASSED_ON_CATALOG_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)

ServicerContext = grpc.aio.ServicerContext[object, object]
_log = logging.getLogger(__name__)


class OrderServicer(orders_pb2_grpc.OrderServiceServicer):
    """Places and returns orders; asks the catalog service for prices on every new order."""

    def __init__(
        self,
        catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
        store: OrdersStore,
        *,
        catalog_timeout_s: float = DEFAULT_CATALOG_TIMEOUT_S,
    ) -> None:
        """catalog: a CatalogServiceStub on any grpc.aio channel (the mesh's, in production).
        catalog_timeout_s: the catalog call's timeout when the inbound call has no deadline."""
        self._catalog = catalog
        self._store = store
        self._catalog_timeout_s = catalog_timeout_s

    async def PlaceOrder(
        self, request: orders_pb2.PlaceOrderRequest, context: ServicerContext
    ) -> orders_pb2.Order:
        problem = request_problem(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        requested = [
            OrderLine(ln.item_id, ln.quantity, ln.unit_price_cents) for ln in request.lines
        ]
        idempotency = None
        if request.idempotency_key:
            idempotency = IdempotencyKey.for_request(
                request.idempotency_key, request.customer_id, requested
            )
            try:
                earlier = await self._store.find_by_idempotency_key(idempotency)
            except IdempotencyConflict as conflict:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, _conflict_message(conflict))
            if earlier is not None:
                _log.info("order %s returned again for its idempotency key", earlier.order_id)
                return order_message(earlier)

        items = await self._catalog_items(requested, context)
        problem = catalog_problem(requested, items)
        if problem is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        new_order = NewOrder(
            customer_id=request.customer_id,
            restaurant_id=items[0].restaurant_id,
            currency=items[0].currency,
            lines=tuple(
                OrderLine(line.item_id, line.quantity, item.price_cents)
                for line, item in zip(requested, items, strict=True)
            ),
        )
        try:
            placed = await self._store.place(new_order, idempotency)
        except IdempotencyConflict as conflict:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, _conflict_message(conflict))
        except OrderTotalOutOfRange as error:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(error))
        if placed.created:
            _log.info(
                "placed order %s for customer %r: %d lines, %d %s",
                placed.order.order_id,
                placed.order.customer_id,
                len(placed.order.lines),
                placed.order.total_cents,
                placed.order.currency,
            )
        return order_message(placed.order)

    async def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: ServicerContext
    ) -> orders_pb2.Order:
        if not request.order_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "order_id must not be empty")
        order = await self._store.get(request.order_id)
        if order is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"order_id {request.order_id!r}: no such order"
            )
        return order_message(order)

    async def _catalog_items(
        self, lines: Sequence[OrderLine], context: ServicerContext
    ) -> list[catalog_pb2.Item]:
        """Each line's catalog item, fetched concurrently within the inbound deadline; aborts
        the call on the first line (in request order) the catalog could not answer."""
        timeout = context.time_remaining()
        if timeout is None:
            timeout = self._catalog_timeout_s
        if timeout <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "no time left to ask the catalog service"
            )
        results = await asyncio.gather(
            *(
                self._catalog.GetItem(
                    catalog_pb2.GetItemRequest(item_id=ln.item_id), timeout=timeout
                )
                for ln in lines
            ),
            return_exceptions=True,
        )
        items: list[catalog_pb2.Item] = []
        for index, (line, result) in enumerate(zip(lines, results, strict=True)):
            if isinstance(result, grpc.aio.AioRpcError):
                code, message = _catalog_failure(index, line.item_id, result)
                await context.abort(code, message)
            if isinstance(result, BaseException):
                raise result
            items.append(result)
        return items


def request_problem(request: orders_pb2.PlaceOrderRequest) -> str | None:
    """What is wrong with a PlaceOrderRequest on its face (naming the field), or None."""
    if not request.customer_id:
        return "customer_id must not be empty"
    if not request.lines:
        return "lines must not be empty: an order needs at least one line"
    if len(request.lines) > MAX_LINES:
        return f"lines has {len(request.lines)} entries; an order has at most {MAX_LINES}"
    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        return (
            f"idempotency_key has {len(request.idempotency_key)} characters; "
            f"the most is {MAX_IDEMPOTENCY_KEY_LENGTH}"
        )
    first_line_of_item: dict[str, int] = {}
    for index, line in enumerate(request.lines):
        field = f"lines[{index}]"
        if not line.item_id:
            return f"{field}.item_id must not be empty"
        if not 1 <= line.quantity <= MAX_QUANTITY:
            return f"{field}.quantity must be between 1 and {MAX_QUANTITY}, got {line.quantity}"
        if line.unit_price_cents < 0:
            return f"{field}.unit_price_cents must not be negative, got {line.unit_price_cents}"
        earlier = first_line_of_item.setdefault(line.item_id, index)
        if earlier != index:
            return (
                f"{field}.item_id {line.item_id!r} repeats lines[{earlier}].item_id: "
                "put the whole quantity of an item on one line"
            )
    return None


def catalog_problem(lines: Sequence[OrderLine], items: Sequence[catalog_pb2.Item]) -> str | None:
    """Why the catalog's items refuse these lines (naming the line and item), or None."""
    first = items[0]
    for index, (line, item) in enumerate(zip(lines, items, strict=True)):
        field = f"lines[{index}]"
        if not item.available:
            return f"{field}.item_id {item.item_id!r} ({item.name}) is not available now"
        if line.unit_price_cents and line.unit_price_cents != item.price_cents:
            return (
                f"{field}.unit_price_cents is {line.unit_price_cents}, but item "
                f"{item.item_id!r} costs {item.price_cents} {item.currency} cents now: "
                "show the customer the new price, or send 0 to accept the current price"
            )
        if item.restaurant_id != first.restaurant_id:
            return (
                f"{field}.item_id {item.item_id!r} is from restaurant {item.restaurant_id!r}, "
                f"but lines[0].item_id {first.item_id!r} is from {first.restaurant_id!r}: "
                "an order is for one restaurant"
            )
        if item.currency != first.currency:
            return (
                f"{field}.item_id {item.item_id!r} is priced in {item.currency}, but "
                f"lines[0].item_id {first.item_id!r} in {first.currency}: "
                "an order has one currency"
            )
    return None


def order_message(order: StoredOrder) -> orders_pb2.Order:
    """The wire form of a stored order."""
    create_time = Timestamp()
    create_time.FromDatetime(order.create_time)
    return orders_pb2.Order(
        order_id=order.order_id,
        customer_id=order.customer_id,
        restaurant_id=order.restaurant_id,
        lines=[
            orders_pb2.OrderLine(
                item_id=line.item_id,
                quantity=line.quantity,
                unit_price_cents=line.unit_price_cents,
            )
            for line in order.lines
        ],
        total_cents=order.total_cents,
        currency=order.currency,
        status=orders_pb2.OrderStatus.Value(f"ORDER_STATUS_{order.status.value}"),
        create_time=create_time,
    )


def _catalog_failure(
    index: int, item_id: str, error: grpc.aio.AioRpcError
) -> tuple[grpc.StatusCode, str]:
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return code, f"lines[{index}].item_id {item_id!r}: no such item in the catalog"
    message = (
        f"the catalog service failed while pricing lines[{index}] (item {item_id!r}): "
        f"{code.name}: {error.details()}"
    )
    return (code if code in _PASSED_ON_CATALOG_CODES else grpc.StatusCode.UNAVAILABLE), message


def _conflict_message(conflict: IdempotencyConflict) -> str:
    return (
        f"{conflict}: another customer_id or other lines; "
        "a retry must repeat the request exactly, and a new order needs a new key"
    )
