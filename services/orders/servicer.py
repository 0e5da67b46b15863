"""foodmesh.orders.v1.OrderService: checkout as a saga over users, catalog, payments and
delivery (services/orders/checkout.py), with orders as event streams (store.py, state.py).

The order of work in PlaceOrder is the point. Everything the request alone can show wrong is
refused first, before any call or write. A retry with a used idempotency key is answered from
the store without asking anyone (the item may have sold out since; the order exists all the
same). Then the customer is checked with users and the lines are priced by the catalog, all at
once, within the inbound call's deadline: an unknown customer or item means no order at all.
Only then is the order written (OrderPlaced), and its saga started on this instance; the call
waits for the saga's answer (CONFIRMED or REJECTED) until the caller's deadline, and returns
the order as PENDING when the deadline comes first, while the saga goes on.

Failures of a dependency keep their code (UNAVAILABLE, DEADLINE_EXCEEDED, ...) and say which
dependency failed, so callers and the mesh's retry policy can tell an outage from a bug
(INTERNAL). A line that repeats an earlier line's item is refused rather than merged: merging
would make the stored lines differ from the request the caller sees echoed.

Delivery progress (OUT_FOR_DELIVERY, DELIVERED) reaches an order through delivery's events,
not through this servicer (services/orders/progress.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from foodmesh.orders.v1 import events_pb2, orders_pb2, orders_pb2_grpc
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from meshkit.events import StaleStream
from meshkit.saga import SagaRunner
from meshkit.storage.idempotency import key_problem
from services.callers import calling_user
from services.orders.state import (
    FINAL,
    SETTLED,
    OrderState,
    OrderStatus,
)
from services.orders.store import OrdersStore
from services.refusals import Refusal, failed_precondition, invalid, not_found, refusing, status_of

MAX_LINES = 100
MAX_QUANTITY = 1000
MAX_TEXT_LENGTH = 500
DEFAULT_DEPENDENCY_TIMEOUT_S = 5.0
WATCH_POLL_S = 0.1

# Dependency failures whose code the caller gets unchanged; any other error of a dependency
# becomes UNAVAILABLE, since the caller's request was valid and the fault lies elsewhere.
_PASSED_ON_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)

ServicerContext = grpc.aio.ServicerContext[object, object]
_log = logging.getLogger(__name__)
_STATUS = {
    orders_pb2.OrderStatus.Value(f"ORDER_STATUS_{status.value}"): status for status in OrderStatus
}


class OrderServicer(orders_pb2_grpc.OrderServiceServicer):
    """Places orders through the checkout saga, cancels them, and follows them."""

    def __init__(
        self,
        *,
        users: users_pb2_grpc.UserServiceAsyncStub,
        catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
        delivery: delivery_pb2_grpc.DeliveryServiceAsyncStub,
        store: OrdersStore,
        runner: SagaRunner[OrderState],
        dependency_timeout_s: float = DEFAULT_DEPENDENCY_TIMEOUT_S,
    ) -> None:
        """Stubs on any grpc.aio channel (the mesh's, in production). dependency_timeout_s:
        a dependency call's timeout when the inbound call has no deadline."""
        self._users = users
        self._catalog = catalog
        self._delivery = delivery
        self._store = store
        self._runner = runner
        self._dependency_timeout_s = dependency_timeout_s

    @refusing
    async def PlaceOrder(
        self, request: orders_pb2.PlaceOrderRequest, context: ServicerContext
    ) -> orders_pb2.Order:
        request = for_caller(request, calling_user(context))
        problem = request_problem(request)
        if problem is not None:
            raise invalid(problem)
        key = self._store.placing.key_of(request)
        earlier = await self._store.order_for_key(key)
        if earlier is not None:
            _log.info("order %s returned again for its idempotency key", earlier.order_id)
            return await self._settled(earlier.order_id, context, SETTLED)
        timeout = await self._dependency_timeout(context)
        items, _ = await asyncio.gather(
            self._catalog_items(request.lines, timeout), self._check_customer(request, timeout)
        )
        problem = catalog_problem(request.lines, items)
        if problem is not None:
            raise failed_precondition(problem)
        placed = order_placed(request, items)
        state, created = await self._store.place(placed, key, self._runner.leases)
        if created:
            _log.info(
                "placed order %s for customer %r: %d lines, %d %s",
                state.order_id,
                placed.customer_id,
                len(placed.lines),
                placed.total_cents,
                placed.currency,
            )
            await self._runner.start(state.order_id, leased=True)
        return await self._settled(state.order_id, context, SETTLED)

    @refusing
    async def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: ServicerContext
    ) -> orders_pb2.Order:
        order, _ = await self._view(request.order_id, calling_user(context))
        return order

    @refusing
    async def CancelOrder(
        self, request: orders_pb2.CancelOrderRequest, context: ServicerContext
    ) -> orders_pb2.Order:
        order, _ = await self._view(request.order_id, calling_user(context))
        while True:
            state, version = await self._store.load(request.order_id)
            events = await self._cancellation(state, context)
            if not events:
                break
            try:
                await self._store.record(state.order_id, version, events)
            except StaleStream:
                continue  # the saga moved on meanwhile: decide again
            _log.info("order %s: cancellation requested", state.order_id)
            break
        await self._runner.start(order.order_id)
        return await self._settled(order.order_id, context, FINAL)

    async def WatchOrder(
        self, request: orders_pb2.WatchOrderRequest, context: ServicerContext
    ) -> AsyncIterator[orders_pb2.Order]:
        try:
            order, _ = await self._view(request.order_id, calling_user(context))
        except Refusal as refusal:
            status = status_of(refusal)
            assert status is not None
            await context.abort(*status)
        yield order
        sent = order.SerializeToString()
        while _STATUS[order.status] not in FINAL:
            await asyncio.sleep(WATCH_POLL_S)
            found = await self._store.get(request.order_id)
            assert found is not None
            order, _ = found
            current = order.SerializeToString()
            if current != sent:
                yield order
                sent = current

    # -- helpers --------------------------------------------------------------------------

    async def _view(self, order_id: str, caller: str | None = None) -> tuple[orders_pb2.Order, int]:
        """The order and its version; NOT_FOUND for a `caller` (x-user-id) whose order it
        is not, exactly as for an order that does not exist (no telling which)."""
        if not order_id:
            raise invalid("order_id must not be empty")
        found = await self._store.get(order_id)
        if found is None or (caller is not None and found[0].customer_id != caller):
            raise not_found(f"order_id {order_id!r}: no such order")
        return found

    async def _settled(
        self, order_id: str, context: ServicerContext, until: frozenset[OrderStatus]
    ) -> orders_pb2.Order:
        """The order once its status is in `until`, or as it is when the caller's deadline
        is near (a little time is kept to send the answer)."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        give_up = None if remaining is None else loop.time() + remaining - 0.05
        while True:
            order, _ = await self._view(order_id)
            if _STATUS[order.status] in until:
                return order
            if give_up is not None and loop.time() >= give_up:
                return order
            wait = WATCH_POLL_S if give_up is None else min(WATCH_POLL_S, give_up - loop.time())
            saga = self._runner.running(order_id)
            if saga is None:  # driven by another instance: its records show up in the view
                await asyncio.sleep(max(0.0, wait))
            else:  # driven here: answer the moment it ends, not at the next poll
                await asyncio.wait({saga}, timeout=max(0.0, wait))

    async def _cancellation(
        self, state: OrderState, context: ServicerContext
    ) -> list[events_pb2.CancellationRequested | events_pb2.StepCompensated]:
        """What to record to cancel the order now ([] when nothing: already cancelling or
        cancelled); refuses an order that cannot be cancelled any more."""
        if state.status in (OrderStatus.REJECTED, OrderStatus.DELIVERED):
            raise failed_precondition(
                f"order {state.order_id!r} is {state.status.value}: only a PENDING or "
                "CONFIRMED order can be cancelled"
            )
        if state.status is OrderStatus.OUT_FOR_DELIVERY:
            raise failed_precondition(
                f"order {state.order_id!r} is OUT_FOR_DELIVERY: the food is picked up already"
            )
        if state.status is OrderStatus.CANCELLED or state.progress.failure is not None:
            return []
        requested = events_pb2.CancellationRequested(order_id=state.order_id)
        if state.status is OrderStatus.PENDING:
            return [requested]
        # CONFIRMED: the delivery is cancelled first, here, so that an order whose food is
        # picked up is refused before its payment is touched.
        timeout = await self._dependency_timeout(context)
        try:
            await self._delivery.CancelDelivery(
                delivery_pb2.CancelDeliveryRequest(
                    delivery_id=state.delivery_id,
                    idempotency_key=f"{state.order_id}/cancel-order/{state.delivery_id}",
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise failed_precondition(
                    f"order {state.order_id!r} cannot be cancelled: {error.details()}"
                ) from None
            raise _dependency_failure("delivery", "cancelling the delivery", error) from None
        return [
            requested,
            events_pb2.StepCompensated(order_id=state.order_id, step="schedule_delivery"),
        ]

    async def _dependency_timeout(self, context: ServicerContext) -> float:
        timeout = context.time_remaining()
        if timeout is None:
            return self._dependency_timeout_s
        if timeout <= 0:
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "no time left to call dependencies")
        return timeout

    async def _check_customer(
        self, request: orders_pb2.PlaceOrderRequest, timeout: float
    ) -> users_pb2.User:
        try:
            return await self._users.GetUser(
                users_pb2.GetUserRequest(user_id=request.customer_id), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise not_found(f"customer_id {request.customer_id!r}: no such user") from None
            raise _dependency_failure("users", "checking customer_id", error) from None

    async def _catalog_items(
        self, lines: Sequence[orders_pb2.OrderLine], timeout: float
    ) -> list[catalog_pb2.Item]:
        """Each line's catalog item, fetched concurrently; refuses on the first line (in
        request order) the catalog could not answer."""
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
                if result.code() == grpc.StatusCode.NOT_FOUND:
                    raise not_found(
                        f"lines[{index}].item_id {line.item_id!r}: no such item in the catalog"
                    )
                raise _dependency_failure(
                    "catalog", f"pricing lines[{index}] (item {line.item_id!r})", result
                )
            if isinstance(result, BaseException):
                raise result
            items.append(result)
        return items


def order_placed(
    request: orders_pb2.PlaceOrderRequest, items: Sequence[catalog_pb2.Item]
) -> events_pb2.OrderPlaced:
    """The first event of a new order: the request's lines at the catalog's prices."""
    lines = [
        orders_pb2.OrderLine(
            item_id=line.item_id, quantity=line.quantity, unit_price_cents=item.price_cents
        )
        for line, item in zip(request.lines, items, strict=True)
    ]
    create_time = Timestamp()
    create_time.FromDatetime(datetime.now(UTC))
    return events_pb2.OrderPlaced(
        order_id=str(uuid.uuid4()),
        customer_id=request.customer_id,
        restaurant_id=items[0].restaurant_id,
        lines=lines,
        total_cents=order_total_cents(lines),
        currency=items[0].currency,
        payment_method=request.payment_method,
        delivery_address=request.delivery_address,
        create_time=create_time,
    )


INT64_MAX = 2**63 - 1


def order_total_cents(lines: Sequence[orders_pb2.OrderLine]) -> int:
    """The sum of quantity * unit_price_cents; OUT_OF_RANGE when it exceeds int64."""
    total = sum(line.quantity * line.unit_price_cents for line in lines)
    if total > INT64_MAX:
        raise Refusal(
            grpc.StatusCode.OUT_OF_RANGE,
            f"the order total of {total} cents exceeds the largest total, {INT64_MAX}",
        )
    return total


def _dependency_failure(service: str, doing: str, error: grpc.aio.AioRpcError) -> Refusal:
    code = error.code()
    message = f"the {service} service failed while {doing}: {code.name}: {error.details()}"
    return Refusal(code if code in _PASSED_ON_CODES else grpc.StatusCode.UNAVAILABLE, message)


def for_caller(
    request: orders_pb2.PlaceOrderRequest, caller: str | None
) -> orders_pb2.PlaceOrderRequest:
    """The request as placed by `caller` (the x-user-id the gateway set), whose orders are
    their own: an empty customer_id becomes the caller, another one is PERMISSION_DENIED."""
    if caller is None or request.customer_id == caller:
        return request
    if request.customer_id:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"customer_id {request.customer_id!r} is not the signed-in user: "
            "an order is placed for oneself (leave customer_id empty)",
        )
    mine = orders_pb2.PlaceOrderRequest()
    mine.CopyFrom(request)
    mine.customer_id = caller
    return mine


def request_problem(request: orders_pb2.PlaceOrderRequest) -> str | None:
    """What is wrong with a PlaceOrderRequest on its face (naming the field), or None."""
    if not request.customer_id:
        return "customer_id must not be empty"
    if not request.lines:
        return "lines must not be empty: an order needs at least one line"
    if len(request.lines) > MAX_LINES:
        return f"lines has {len(request.lines)} entries; an order has at most {MAX_LINES}"
    for name in ("payment_method", "delivery_address"):
        value = getattr(request, name)
        if not value.strip():
            return f"{name} must not be empty"
        if len(value) > MAX_TEXT_LENGTH:
            return f"{name} has {len(value)} characters; the most is {MAX_TEXT_LENGTH}"
    key = key_problem(request.idempotency_key)
    if key is not None:
        return key
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


def catalog_problem(
    lines: Sequence[orders_pb2.OrderLine], items: Sequence[catalog_pb2.Item]
) -> str | None:
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
