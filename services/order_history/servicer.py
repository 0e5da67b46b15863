"""foodmesh.orderhistory.v1.OrderHistoryService on top of OrderHistoryStore."""

from __future__ import annotations

from typing import Any

import grpc

from foodmesh.orderhistory.v1 import orderhistory_pb2, orderhistory_pb2_grpc
from services.order_history.store import OrderHistoryStore
from services.paging import PageToken, page_size
from services.refusals import invalid, refusing

ServicerContext = grpc.aio.ServicerContext[Any, Any]


class OrderHistoryServicer(orderhistory_pb2_grpc.OrderHistoryServiceServicer):
    """Answers ListCustomerOrders from the read model's database."""

    def __init__(self, store: OrderHistoryStore) -> None:
        self._store = store

    @refusing
    async def ListCustomerOrders(
        self, request: orderhistory_pb2.ListCustomerOrdersRequest, context: ServicerContext
    ) -> orderhistory_pb2.ListCustomerOrdersResponse:
        if not request.customer_id.strip():
            raise invalid("customer_id must not be empty")
        size = page_size(request.page_size)
        after = PageToken.resume(
            request.page_token,
            rpc="ListCustomerOrders",
            field="customer_id",
            scope=request.customer_id,
        )
        if after and " " not in after:
            raise invalid("page_token is malformed: send the next_page_token unchanged")
        page = await self._store.page(request.customer_id, after, size)
        token = PageToken(request.customer_id, page.last_key).encode() if page.has_more else ""
        return orderhistory_pb2.ListCustomerOrdersResponse(
            orders=page.orders, next_page_token=token
        )
