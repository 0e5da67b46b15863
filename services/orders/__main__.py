"""`python -m services.orders`: one orders instance; it prices orders through catalog,
which it finds in Consul and calls on a mesh channel."""

from __future__ import annotations

import asyncio
import sys

from foodmesh.catalog.v1 import catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from services.orders.servicer import OrderServicer
from services.orders.store import OrdersStore
from services.runtime import ServiceRuntime

SERVICE = "orders"


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv) as runtime:
        store = await runtime.closing(OrdersStore.open(runtime.database_path()))
        catalog = runtime.channel("catalog")
        server = runtime.server()
        server.add_service(
            orders_pb2.DESCRIPTOR.services_by_name["OrderService"],
            orders_pb2_grpc.add_OrderServiceServicer_to_server,
            OrderServicer(catalog_pb2_grpc.CatalogServiceStub(catalog), store),
        )
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
