"""MeshChannel's endpoint handling and its four call shapes, against real in-process
grpc.aio servers found through a StaticResolver (changes are pushed, never waited for)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc import aio

from mesh import MeshChannel
from mesh.policy import MethodPolicy, ServicePolicy
from mesh.testing import InProcessServer, StaticResolver

SERVICE = "echo"


class EchoServer(InProcessServer):
    """Answers every shape with its own name; `hold` parks unary calls until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()
        super().__init__(
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                    "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                },
            )
        )

    async def unary(self, request: bytes, context: aio.ServicerContext) -> bytes:
        self.calls += 1
        if request == b"deadline":
            return f"{context.time_remaining():.3f}".encode()
        if self.hold is not None:
            self.entered.set()
            await self.hold.wait()
        return self.name.encode() + b":" + request

    async def server_stream(
        self, request: bytes, context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        for i in range(3):
            yield f"{self.name}:{i}".encode()

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> bytes:
        self.calls += 1
        return b"+".join([r async for r in requests])

    async def bidi(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        async for request in requests:
            yield request.upper()


@pytest.fixture
async def servers() -> AsyncIterator[list[EchoServer]]:
    started = [EchoServer("a"), EchoServer("b")]
    for s in started:
        await s.start()
    yield started
    for s in started:
        await s.stop()


ROUND_ROBIN = ServicePolicy(balancer="round_robin")  # these tests are about endpoints, not P2C


def timeout_policy(seconds: float) -> ServicePolicy:
    return ServicePolicy(defaults=MethodPolicy(timeout=seconds))


def unary(channel: aio.Channel) -> aio.UnaryUnaryMultiCallable:
    return channel.unary_unary("/test.Echo/Unary")


async def test_round_robin_over_endpoints(servers: list[EchoServer]) -> None:
    resolver = StaticResolver({SERVICE: [s.address for s in servers]})
    async with MeshChannel(SERVICE, resolver, policy=ROUND_ROBIN) as channel:
        replies = [await unary(channel)(b"x") for _ in range(6)]
    assert sorted(replies) == [b"a:x"] * 3 + [b"b:x"] * 3
    assert replies[0] != replies[1], "consecutive calls go to different endpoints"


async def test_removed_endpoint_gets_no_new_calls_and_in_flight_call_finishes(
    servers: list[EchoServer],
) -> None:
    a, b = servers
    resolver = StaticResolver({SERVICE: [a.address, b.address]})
    async with MeshChannel(SERVICE, resolver, policy=ROUND_ROBIN) as channel:
        assert await channel.wait_for_endpoints(5)
        a.hold = asyncio.Event()
        b.hold = asyncio.Event()
        in_flight = [unary(channel)(b"1"), unary(channel)(b"2")]
        await asyncio.wait_for(asyncio.gather(a.entered.wait(), b.entered.wait()), 5)
        await resolver.set(SERVICE, [b.address])
        await _until(lambda: len(channel.endpoints) == 1)
        a.hold.set()
        b.hold.set()
        replies = await asyncio.gather(*in_flight)
        assert sorted(r.split(b":")[0] for r in replies) == [b"a", b"b"], "neither call lost"
        a_calls = a.calls
        assert [await unary(channel)(b"y") for _ in range(4)] == [b"b:y"] * 4
        assert a.calls == a_calls


async def test_added_endpoint_gets_calls(servers: list[EchoServer]) -> None:
    a, b = servers
    resolver = StaticResolver({SERVICE: [a.address]})
    async with MeshChannel(SERVICE, resolver, policy=ROUND_ROBIN) as channel:
        assert await unary(channel)(b"1") == b"a:1"
        await resolver.set(SERVICE, [a.address, b.address])
        await _until(lambda: len(channel.endpoints) == 2)
        replies = {await unary(channel)(b"z") for _ in range(2)}
        assert replies == {b"a:z", b"b:z"}


async def test_no_healthy_endpoint_fails_fast_naming_the_service() -> None:
    resolver = StaticResolver({SERVICE: []})
    async with MeshChannel(SERVICE, resolver, policy=timeout_policy(30)) as ch:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(aio.AioRpcError) as first:
            await unary(ch)(b"x")
        with pytest.raises(aio.AioRpcError) as second:  # resolved now: the fast path
            await unary(ch)(b"x")
        assert loop.time() - started < 5, "must not wait for the 30 s deadline"
    for err in (first.value, second.value):
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "'echo'" in (err.details() or "")


async def test_call_before_first_resolution_waits_for_it(servers: list[EchoServer]) -> None:
    resolver = StaticResolver()  # knows nothing yet: first answer is the empty set...
    never = _SilentResolver()  # ...so use one that has not answered at all
    async with MeshChannel(SERVICE, never) as channel:
        call = unary(channel)(b"early")
        assert not call.done()
        await never.answer([servers[0].address])
        assert await call == b"a:early"
        assert await call.code() == grpc.StatusCode.OK
    await resolver.close()


async def test_unresolved_service_fails_with_unavailable_within_deadline() -> None:
    async with MeshChannel(SERVICE, _SilentResolver()) as channel:
        with pytest.raises(aio.AioRpcError) as err:
            await unary(channel)(b"x", timeout=0.2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not resolved" in (err.value.details() or "")


async def test_default_deadline_applies_when_caller_gives_none(servers: list[EchoServer]) -> None:
    resolver = StaticResolver({SERVICE: [servers[0].address]})
    async with MeshChannel(SERVICE, resolver, policy=timeout_policy(3.0)) as ch:
        remaining = float(await unary(ch)(b"deadline"))
        explicit = float(await unary(ch)(b"deadline", timeout=60))
    # the wire encoding of grpc-timeout rounds up a little
    assert 2.0 < remaining <= 3.2
    assert 50 < explicit <= 60.2


async def test_all_four_call_shapes(servers: list[EchoServer]) -> None:
    resolver = StaticResolver({SERVICE: [servers[0].address]})
    async with MeshChannel(SERVICE, resolver) as channel:
        assert await unary(channel)(b"u") == b"a:u"

        stream = channel.unary_stream("/test.Echo/ServerStream")(b"s")
        assert [r async for r in stream] == [b"a:0", b"a:1", b"a:2"]

        def parts() -> Iterator[bytes]:
            yield from (b"p", b"q", b"r")

        assert await channel.stream_unary("/test.Echo/ClientStream")(parts()) == b"p+q+r"

        bidi = channel.stream_stream("/test.Echo/Bidi")()
        await bidi.write(b"hi")
        assert await bidi.read() == b"HI"
        await bidi.write(b"yo")
        await bidi.done_writing()
        assert await bidi.read() == b"YO"
        assert await bidi.code() == grpc.StatusCode.OK


async def test_streaming_shapes_wait_for_first_resolution(servers: list[EchoServer]) -> None:
    silent = _SilentResolver()
    async with MeshChannel(SERVICE, silent) as channel:
        stream = channel.unary_stream("/test.Echo/ServerStream")(b"s")
        bidi = channel.stream_stream("/test.Echo/Bidi")()
        await silent.answer([servers[1].address])
        assert [r async for r in stream] == [b"b:0", b"b:1", b"b:2"]
        await bidi.write(b"late")
        await bidi.done_writing()
        assert await bidi.read() == b"LATE"


async def test_state_ready_and_closed(servers: list[EchoServer]) -> None:
    resolver = StaticResolver({SERVICE: [servers[0].address]})
    channel = MeshChannel(SERVICE, resolver)
    await asyncio.wait_for(channel.channel_ready(), 5)
    assert channel.get_state() == grpc.ChannelConnectivity.READY
    await channel.close()
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    with pytest.raises(aio.AioRpcError) as err:
        await unary(channel)(b"x")
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert "closed" in (err.value.details() or "")
    with pytest.raises(aio.AioRpcError) as stream_err:
        await channel.unary_stream("/test.Echo/ServerStream")(b"s").read()
    assert stream_err.value.code() == grpc.StatusCode.CANCELLED
    assert "closed" in (stream_err.value.details() or "")


class _SilentResolver:
    """A resolver that has not answered until `answer()` is called."""

    def __init__(self) -> None:
        self._answer: asyncio.Queue[list[str]] = asyncio.Queue()

    async def answer(self, addresses: list[str]) -> None:
        await self._answer.put(addresses)

    async def watch(self, service: str) -> AsyncIterator[frozenset]:
        inner = StaticResolver({service: await self._answer.get()})
        async for endpoints in inner.watch(service):
            yield endpoints

    async def close(self) -> None:
        return None


async def _until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
