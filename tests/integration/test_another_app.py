"""Another app uses the installed `foodmesh` stubs, outside this checkout: first on a plain
grpc.aio channel to one instance, then the same stub on a mesh channel found via Consul; the
demo services are not among what is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import Stack

APP = """
import asyncio, importlib.util, json, sys
import grpc
import mesh
from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc

async def main(address):
    request = catalog_pb2.GetItemRequest(item_id="sakura-salmon-nigiri")
    async with grpc.aio.insecure_channel(address) as plain:
        direct = await catalog_pb2_grpc.CatalogServiceStub(plain).GetItem(request, timeout=5)
    async with mesh.channel("catalog") as meshed:  # CONSUL_HTTP_ADDR from the environment
        via_mesh = await catalog_pb2_grpc.CatalogServiceStub(meshed).GetItem(request)
    print(json.dumps({"direct": direct.name, "mesh": via_mesh.name,
                      "stubs_from": catalog_pb2_grpc.__file__,
                      "demo_installed": importlib.util.find_spec("services") is not None}))

asyncio.run(main(sys.argv[1]))
"""


def test_installed_stubs_work_on_plain_and_mesh_channels(stack: Stack, tmp_path: Path) -> None:
    catalog = stack.start("catalog")
    stack.wait_passing("catalog", {catalog.port})
    app = tmp_path / "app.py"
    app.write_text(APP)
    env = stack.env()
    env.pop("PYTHONPATH", None)
    # -I: no checkout on sys.path, no PYTHONPATH: only what is installed in the environment.
    ran = subprocess.run(
        [sys.executable, "-I", str(app), catalog.address],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["direct"] == result["mesh"] == "Salmon Nigiri"
    assert "/foodmesh/catalog/v1/" in result["stubs_from"]
    assert result["demo_installed"] is False, "the demo services are not an installed package"
