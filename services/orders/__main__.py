"""`python -m services.orders`: one orders instance; it prices orders through catalog,
which it finds in Consul and calls on a mesh channel."""

from __future__ import annotations

import asyncio
import sys

import mesh
from foodmesh.catalog.v1 import catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.server import MeshServer, new_instance_id
from mesh.telemetry.tracing import tracing_from_env
from services.cli import (
    configure_logging,
    mesh_policy,
    parse_args,
    project_version,
    server_config,
)
from services.datadir import database_path
from services.orders.servicer import OrderServicer
from services.orders.store import OrdersStore

SERVICE = "orders"


async def main(argv: list[str]) -> int:
    args = parse_args(SERVICE, argv)
    configure_logging(args.log_level, SERVICE)
    policy = mesh_policy(args)
    config = server_config(args, version=project_version())
    instance_id = new_instance_id(SERVICE)
    tracing = tracing_from_env(SERVICE, instance_id=instance_id)
    store = await OrdersStore.open(database_path(args.data_dir, SERVICE))
    catalog = mesh.channel("catalog", policy=policy, tracing=tracing)
    try:
        server = MeshServer(config, tracing=tracing, instance_id=instance_id)
        server.add_service(
            orders_pb2.DESCRIPTOR.services_by_name["OrderService"],
            orders_pb2_grpc.add_OrderServiceServicer_to_server,
            OrderServicer(catalog_pb2_grpc.CatalogServiceStub(catalog), store),
        )
        return await server.run()
    finally:
        await catalog.close()
        await store.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
