"""`python -m services.order_history`: one order-history instance (Consul name
`order-history`). It consumes the orders', delivery's and the catalog's events from JetStream
(durable consumers `order-history` on ORDERS, DELIVERY and CATALOG, shared by every instance)
into `<data-dir>/order-history.db`, and answers ListCustomerOrders from there alone.
`python -m services.order_history.rebuild` makes that database again from the streams."""

from __future__ import annotations

import asyncio
import sys

from foodmesh.orderhistory.v1 import orderhistory_pb2, orderhistory_pb2_grpc
from services.order_history.servicer import OrderHistoryServicer
from services.order_history.store import OrderHistoryStore
from services.order_history.streams import SERVICE, consumed
from services.runtime import ServiceRuntime


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv) as runtime:
        store = await runtime.closing(OrderHistoryStore.open(runtime.database_location()))
        for stream, event_types, handlers in consumed(store):
            runtime.consume(store.database, stream, event_types, handlers)
        server = runtime.server()
        server.add_service(
            orderhistory_pb2.DESCRIPTOR.services_by_name["OrderHistoryService"],
            orderhistory_pb2_grpc.add_OrderHistoryServiceServicer_to_server,
            OrderHistoryServicer(store),
        )
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
