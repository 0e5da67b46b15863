"""`python -m services.catalog`: one catalog instance, registered in Consul; it relays the
menu's changes (ItemChanged, RestaurantChanged) from its outbox to the CATALOG stream."""

from __future__ import annotations

import asyncio
import sys

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from services.catalog.servicer import CatalogServicer
from services.catalog.store import CatalogStore
from services.runtime import ServiceRuntime

SERVICE = "catalog"


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv) as runtime:
        store = await runtime.closing(CatalogStore.open(runtime.database_location()))
        runtime.publish_outbox(store.database)
        server = runtime.server()
        server.add_service(
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
            catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
            CatalogServicer(store),
        )
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
