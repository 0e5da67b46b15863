"""`python -m services.catalog`: one catalog instance, registered in Consul."""

from __future__ import annotations

import asyncio
import sys

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh.server import MeshServer, new_instance_id
from mesh.telemetry.tracing import tracing_from_env
from services.catalog.servicer import CatalogServicer
from services.catalog.store import CatalogStore
from services.cli import (
    configure_logging,
    mesh_policy,
    parse_args,
    project_version,
    server_config,
)
from services.datadir import database_path

SERVICE = "catalog"


async def main(argv: list[str]) -> int:
    args = parse_args(SERVICE, argv)
    configure_logging(args.log_level, SERVICE)
    mesh_policy(args)  # catalog calls no one yet, but a bad policy file must not pass silently
    config = server_config(args, version=project_version())
    instance_id = new_instance_id(SERVICE)
    tracing = tracing_from_env(SERVICE, instance_id=instance_id)
    store = await CatalogStore.open(database_path(args.data_dir, SERVICE))
    try:
        server = MeshServer(config, tracing=tracing, instance_id=instance_id)
        server.add_service(
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
            catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
            CatalogServicer(store),
        )
        return await server.run()
    finally:
        await store.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
