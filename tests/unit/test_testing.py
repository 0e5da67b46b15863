"""mesh.testing, as a user's tests use it: a generated stub on ChannelFor, a MockChannel that
answers like a server (status codes, serialization, every call shape), MockChannels as the
sub-channels of a MeshChannel, and the fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh import MeshChannel
from mesh.discovery.endpoint import Endpoint
from mesh.policy import MethodPolicy, ServicePolicy
from mesh.testing import (
    ChannelFor,
    FakeClock,
    InProcessServer,
    MockChannel,
    MockContext,
    StaticResolver,
    rpc_error,
)

C = grpc.StatusCode


class FakeCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    """A catalog with one item; anything else is NOT_FOUND."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def GetItem(
        self, request: catalog_pb2.GetItemRequest, context: Any
    ) -> catalog_pb2.Item:
        self.asked.append(request.item_id)
        if request.item_id != "tea":
            await context.abort(C.NOT_FOUND, f"no item {request.item_id!r}")
        return catalog_pb2.Item(item_id="tea", name="Green tea", price_cents=250)


def catalog_service(catalog: FakeCatalog) -> tuple[Any, FakeCatalog]:
    return (catalog_pb2_grpc.add_CatalogServiceServicer_to_server, catalog)


async def test_channel_for_serves_a_generated_stub_through_the_mesh() -> None:
    catalog = FakeCatalog()
    async with ChannelFor(catalog_service(catalog), service="catalog", instances=2) as channel:
        assert isinstance(channel, MeshChannel) and channel.service == "catalog"
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for _ in range(4):
            item = await stub.GetItem(catalog_pb2.GetItemRequest(item_id="tea"))
            assert item.name == "Green tea"
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.GetItem(catalog_pb2.GetItemRequest(item_id="cake"))
        assert caught.value.code() is C.NOT_FOUND and "'cake'" in (caught.value.details() or "")
        assert len(channel.endpoints) == 2
    assert catalog.asked.count("tea") == 4


async def test_in_process_server_serves_health_and_reflection() -> None:
    async with InProcessServer(catalog_service(FakeCatalog()), reflection=True) as server:
        answer = await health_pb2_grpc.HealthStub(server.channel).Check(
            health_pb2.HealthCheckRequest()
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        names = await _reflected_services(server.channel)
    assert "foodmesh.catalog.v1.CatalogService" in names and "grpc.health.v1.Health" in names


async def _reflected_services(channel: aio.Channel) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in stub.ServerReflectionInfo(iter([request])):
        return {service.name for service in answer.list_services_response.service}
    return set()


async def test_mock_channel_answers_a_stub_as_a_server_would() -> None:
    catalog = FakeCatalog()
    channel = MockChannel(catalog_service(catalog))
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    item = await stub.GetItem(catalog_pb2.GetItemRequest(item_id="tea"), metadata=(("k", "v"),))
    assert item == catalog_pb2.Item(item_id="tea", name="Green tea", price_cents=250)
    call = stub.GetItem(catalog_pb2.GetItemRequest(item_id="cake"))
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is C.NOT_FOUND
    assert await call.code() is C.NOT_FOUND and await call.details() == "no item 'cake'"
    assert [(c.method, c.request.item_id, c.metadata) for c in channel.calls] == [
        ("/foodmesh.catalog.v1.CatalogService/GetItem", "tea", (("k", "v"),)),
        ("/foodmesh.catalog.v1.CatalogService/GetItem", "cake", ()),
    ]


async def test_mock_channel_ends_calls_as_the_real_server_does() -> None:
    """The same servicer behind a real in-process server and behind a MockChannel: the same
    answers and statuses, for a good request, a missing item, a request that cannot be
    serialized (grpc sends an empty message) and an unknown method."""

    async def outcomes(channel: aio.Channel) -> list[tuple[Any, ...]]:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        found: list[tuple[Any, ...]] = []
        requests: list[Any] = [
            catalog_pb2.GetItemRequest(item_id="tea"),
            catalog_pb2.GetItemRequest(item_id="cake"),
            object(),
        ]
        for request in requests:
            try:
                found.append(("ok", await stub.GetItem(request)))
            except aio.AioRpcError as exc:
                found.append((exc.code(), exc.details()))
        try:
            await channel.unary_unary("/foodmesh.catalog.v1.CatalogService/Nope")(b"")
        except aio.AioRpcError as exc:
            found.append((exc.code(),))
        return found

    async with InProcessServer(catalog_service(FakeCatalog())) as server:
        expected = await outcomes(server.channel)
    assert await outcomes(MockChannel(catalog_service(FakeCatalog()))) == expected
    assert [row[0] for row in expected] == ["ok", C.NOT_FOUND, C.NOT_FOUND, C.UNIMPLEMENTED]


async def test_scripted_methods_statuses_exceptions_and_timeouts() -> None:
    async def slow(request: bytes, context: MockContext) -> bytes:
        await asyncio.sleep(5)
        return request

    def broken(request: bytes, context: MockContext) -> bytes:
        raise RuntimeError("boom")

    def busy(request: bytes, context: MockContext) -> bytes:
        context.set_trailing_metadata((("grpc-retry-pushback-ms", "50"),))
        context.set_code(C.RESOURCE_EXHAUSTED)
        context.set_details("busy")
        return b""

    channel = MockChannel(
        methods={
            "test.Svc/Echo": lambda request, context: request.upper(),
            "/test.Svc/Slow": slow,
            "/test.Svc/Broken": broken,
            "/test.Svc/Busy": busy,
        }
    )
    assert await channel.unary_unary("/test.Svc/Echo")(b"hi") == b"HI"
    with pytest.raises(aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Svc/Broken")(b"")
    assert caught.value.code() is C.UNKNOWN and "RuntimeError" in (caught.value.details() or "")
    assert "boom" in (caught.value.details() or "")
    call = channel.unary_unary("/test.Svc/Busy")(b"")
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is C.RESOURCE_EXHAUSTED and caught.value.details() == "busy"
    assert ("grpc-retry-pushback-ms", "50") in tuple(await call.trailing_metadata())
    with pytest.raises(aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Svc/Slow")(b"", timeout=0.05)
    assert caught.value.code() is C.DEADLINE_EXCEEDED


async def test_every_call_shape() -> None:
    async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for part in request.split(b","):
            yield part

    async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b"+".join([r async for r in requests])

    async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()

    handlers = grpc.method_handlers_generic_handler(
        "test.Shapes",
        {
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    channel = MockChannel(handlers)
    read = [m async for m in channel.unary_stream("/test.Shapes/ServerStream")(b"a,b,c")]
    assert read == [b"a", b"b", b"c"]
    assert await channel.stream_unary("/test.Shapes/ClientStream")(iter([b"x", b"y"])) == b"x+y"
    chat = channel.stream_stream("/test.Shapes/Bidi")()
    await chat.write(b"one")
    assert await chat.read() == b"ONE"
    await chat.write(b"two")
    await chat.done_writing()
    assert await chat.read() == b"TWO"
    assert await chat.read() is aio.EOF  # type: ignore[attr-defined]
    assert await chat.code() is C.OK
    assert channel.calls[-1].request == [b"one", b"two"]


async def test_mock_channels_as_a_mesh_channels_endpoints() -> None:
    """Scripted endpoints under the real call path: the failing one is retried elsewhere,
    then ejected, with no socket anywhere."""

    def failing(request: bytes, context: MockContext) -> bytes:
        raise rpc_error(C.UNAVAILABLE, "a is down")

    answers = {
        "10.0.0.1:1": MockChannel(methods={"/test.Svc/Get": failing}),
        "10.0.0.2:1": MockChannel(methods={"/test.Svc/Get": lambda r, c: b"from b"}),
    }

    def factory(endpoint: Endpoint) -> aio.Channel:
        return answers[endpoint.address]

    resolver = StaticResolver({"svc": list(answers)})
    # Round robin makes the order known: every call tries a first until a is ejected.
    policy = ServicePolicy(defaults=MethodPolicy(idempotent=True), balancer="round_robin")
    async with MeshChannel("svc", resolver, policy=policy, channel_factory=factory) as channel:
        get = channel.unary_unary("/test.Svc/Get")
        results = [await get(b"") for _ in range(10)]
    assert results == [b"from b"] * 10
    # a failed 5 times in a row (each call retried on b), then was ejected
    assert len(answers["10.0.0.1:1"].calls) == 5
    assert len(answers["10.0.0.2:1"].calls) == 10


async def test_fake_clock() -> None:
    clock = FakeClock(5.0)
    clock.advance(1.5)
    await clock.sleep(2.0)
    assert clock() == 8.5 and clock.sleeps == [2.0]
