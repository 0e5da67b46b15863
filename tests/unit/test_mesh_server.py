"""MeshServer without Consul: health, reflection of method symbols, and the graceful stop
(NOT_SERVING first, in-flight calls finish, new calls refused)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh.core import keepalive
from mesh.server import MeshServer, ServerConfig
from mesh.server.reflection import MethodAwarePool


class SlowCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def GetItem(
        self, request: catalog_pb2.GetItemRequest, context: aio.ServicerContext
    ) -> catalog_pb2.Item:
        self.entered.set()
        await self.release.wait()
        return catalog_pb2.Item(item_id=request.item_id, name="slow")


@pytest.fixture
async def served() -> AsyncIterator[tuple[MeshServer, SlowCatalog]]:
    servicer = SlowCatalog()
    server = MeshServer(ServerConfig("catalog", port=0, register=False, grace_period=5))
    server.add_service(
        catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
        servicer,
    )
    await server.start()
    yield server, servicer
    servicer.release.set()
    await server.stop()


async def test_health_serving_for_server_and_service(
    served: tuple[MeshServer, SlowCatalog],
) -> None:
    server, _ = served
    async with aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "foodmesh.catalog.v1.CatalogService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_graceful_stop_finishes_in_flight_call(
    served: tuple[MeshServer, SlowCatalog],
) -> None:
    server, servicer = served
    async with aio.insecure_channel(server.address) as channel:
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        in_flight = catalog.GetItem(catalog_pb2.GetItemRequest(item_id="x"), timeout=10)
        await asyncio.wait_for(servicer.entered.wait(), 5)
        stopping = asyncio.create_task(server.stop())
        with pytest.raises(aio.AioRpcError) as err:  # new calls are refused at once...
            await catalog.GetItem(catalog_pb2.GetItemRequest(item_id="y"), timeout=2)
        # gRPC core answers UNAVAILABLE, or CANCELLED when the call raced the shutdown
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert not stopping.done(), "...while the in-flight call holds the stop"
        servicer.release.set()
        assert (await in_flight).name == "slow"
        await asyncio.wait_for(stopping, 10)


async def test_health_goes_not_serving_before_the_server_stops() -> None:
    server = MeshServer(ServerConfig("catalog", port=0, register=False))
    await server.start()
    states: list[int] = []
    async with aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        states.append((await watch.read()).status)
        stopping = asyncio.create_task(server.stop())
        states.append((await watch.read()).status)
        watch.cancel()  # a watch is a call in flight: the stop waits for it
        await asyncio.wait_for(stopping, 5)
    assert states == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]


def test_reflection_pool_finds_files_of_method_symbols() -> None:
    pool = MethodAwarePool()
    by_method = pool.FindFileContainingSymbol("foodmesh.catalog.v1.CatalogService.GetItem")
    assert by_method.name == "foodmesh/catalog/v1/catalog.proto"
    assert pool.FindFileContainingSymbol("foodmesh.catalog.v1.Item").name == by_method.name
    with pytest.raises(KeyError):
        pool.FindFileContainingSymbol("foodmesh.catalog.v1.CatalogService.NoSuchMethod")
    with pytest.raises(KeyError):
        pool.FindFileContainingSymbol("no.such.Symbol")


def test_server_permits_the_pings_clients_send() -> None:
    client = dict(keepalive.client_options())
    server = dict(keepalive.server_options())
    assert (
        client["grpc.keepalive_time_ms"]
        >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    )
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1


def test_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="service_name"):
        ServerConfig("")
    with pytest.raises(ValueError, match="port"):
        ServerConfig("catalog", port=70000)
