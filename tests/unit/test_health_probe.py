"""`python -m mesh.health_probe` as a container's HEALTHCHECK runs it: a real process against
a real MeshServer, each exit code of grpc-health-probe's convention."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh.server import MeshServer, ServerConfig


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.health_probe", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_the_probe_exits_with_grpc_health_probes_codes() -> None:
    server = MeshServer(ServerConfig("catalog", register=False, drain_delay=0, grace_period=0))
    service = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"]
    server.add_service(
        service,
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
        catalog_pb2_grpc.CatalogServiceServicer(),
    )
    port = await server.start()
    address = f"127.0.0.1:{port}"
    try:
        serving = await asyncio.to_thread(probe, address)
        assert serving.returncode == 0, serving.stderr
        assert "the server is SERVING" in serving.stdout
        named = await asyncio.to_thread(probe, address, "--service", service.full_name)
        assert named.returncode == 0, named.stderr
        unknown = await asyncio.to_thread(probe, address, "--service", "no.Such")
        assert unknown.returncode == 3 and "NOT_FOUND" in unknown.stderr
        await server.stop()  # NOT_SERVING first; then the server is gone
        gone = await asyncio.to_thread(probe, address, "--connect-timeout", "0.5")
        assert gone.returncode == 2 and "no connection" in gone.stderr
    finally:
        await server.stop()
    bad = await asyncio.to_thread(probe, address, "--rpc-timeout", "soon")
    assert bad.returncode == 1 and "--rpc-timeout" in bad.stderr


async def test_a_server_going_down_is_unhealthy_before_it_stops_serving() -> None:
    server = MeshServer(ServerConfig("catalog", register=False))
    port = await server.start()
    try:
        await server._health.enter_graceful_shutdown()
        answer = await asyncio.to_thread(probe, f"127.0.0.1:{port}")
        assert answer.returncode == 4 and "NOT_SERVING" in answer.stderr
    finally:
        await server.stop()
