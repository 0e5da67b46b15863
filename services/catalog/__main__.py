"""`python -m services.catalog`: one catalog instance, registered in Consul."""

from __future__ import annotations

import asyncio
import sys

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from services.catalog.servicer import CatalogServicer
from services.catalog.store import CatalogStore
from services.datadir import database_path
from services.runtime import ServiceRuntime

SERVICE = "catalog"


async def main(argv: list[str]) -> int:
    runtime = ServiceRuntime.start(SERVICE, argv)
    store = await CatalogStore.open(database_path(runtime.args.data_dir, SERVICE))
    try:
        server = runtime.server()
        server.add_service(
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
            catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
            CatalogServicer(store),
        )
        return await server.run()
    finally:
        await store.close()
        await runtime.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
