"""Deadlines: the value's arithmetic on a fake clock, the inbound deadline's contextvar, and
DeadlineInterceptor on real in-process grpc.aio servers (all four shapes, health,
reflection, generated services, calls refused when already late)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh.core.deadline import (
    DEFAULT_MARGIN,
    Deadline,
    current_deadline,
    inbound_deadline,
    outbound_timeout,
)
from mesh.server.deadline import DeadlineInterceptor
from mesh.testing import FakeClock, InProcessServer


class TickingClock:
    """Each reading is `step` seconds after the previous one: a server too busy to start."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# -- the value -------------------------------------------------------------------------------


def test_deadline_arithmetic() -> None:
    clock = FakeClock(100.0)
    deadline = Deadline.after(2.0, clock)
    assert deadline == Deadline(102.0)
    clock.now = 101.5
    assert deadline.remaining(clock) == pytest.approx(0.5)
    assert not deadline.expired(clock)
    clock.now = 102.0
    assert deadline.expired(clock)
    clock.now = 103.0
    assert deadline.remaining(clock) == 0.0
    assert min(Deadline(5.0), Deadline(3.0)) == Deadline(3.0)


# -- outbound timeouts -----------------------------------------------------------------------


def test_no_inbound_no_caller_gets_the_default() -> None:
    assert outbound_timeout(None, 10.0, clock=FakeClock(100.0)) == 10.0


def test_no_inbound_caller_timeout_wins_over_default() -> None:
    assert outbound_timeout(30.0, 10.0, clock=FakeClock(100.0)) == 30.0
    assert outbound_timeout(-1.0, 10.0, clock=FakeClock(100.0)) == 0.0


def test_inbound_remaining_less_margin() -> None:
    clock = FakeClock(100.0)
    with inbound_deadline(Deadline(101.0)):
        assert outbound_timeout(None, 10.0, clock=clock) == pytest.approx(1.0 - DEFAULT_MARGIN)
        assert outbound_timeout(None, 0.5, clock=clock) == pytest.approx(1.0 - DEFAULT_MARGIN)
        assert outbound_timeout(None, 10.0, margin=0.1, clock=clock) == pytest.approx(0.9)


def test_caller_shorter_than_inbound_wins() -> None:
    clock = FakeClock(100.0)
    with inbound_deadline(Deadline(101.0)):
        assert outbound_timeout(0.3, 10.0, clock=clock) == 0.3
        assert outbound_timeout(5.0, 10.0, clock=clock) == pytest.approx(1.0 - DEFAULT_MARGIN)


def test_expired_or_nearly_expired_inbound_gives_no_time() -> None:
    clock = FakeClock(100.0)
    with inbound_deadline(Deadline(99.0)):
        assert outbound_timeout(None, 10.0, clock=clock) == 0.0
        assert outbound_timeout(5.0, 10.0, clock=clock) == 0.0
    with inbound_deadline(Deadline(100.0 + DEFAULT_MARGIN / 2)):
        assert outbound_timeout(None, 10.0, clock=clock) == 0.0


# -- the contextvar --------------------------------------------------------------------------


def test_inbound_deadline_is_restored_after_the_block() -> None:
    assert current_deadline() is None
    with inbound_deadline(Deadline(1.0)):
        assert current_deadline() == Deadline(1.0)
        with inbound_deadline(None):
            assert current_deadline() is None
        assert current_deadline() == Deadline(1.0)
    assert current_deadline() is None


async def test_concurrent_tasks_see_their_own_deadline() -> None:
    both_set = asyncio.Barrier(2)

    async def serve(at: float) -> tuple[Deadline | None, Deadline | None]:
        with inbound_deadline(Deadline(at)):
            await both_set.wait()
            mine = current_deadline()

            async def child() -> Deadline | None:
                return current_deadline()

            # a task started while serving inherits the deadline (fan-out calls)
            inherited = await asyncio.get_running_loop().create_task(child())
            return mine, inherited

    first, second = await asyncio.gather(serve(1.0), serve(2.0))
    assert first == (Deadline(1.0), Deadline(1.0))
    assert second == (Deadline(2.0), Deadline(2.0))
    assert current_deadline() is None


# -- the interceptor on a real server --------------------------------------------------------


def seen() -> bytes:
    deadline = current_deadline()
    return b"none" if deadline is None else f"{deadline.remaining():.3f}".encode()


class DeadlineEcho:
    """Every shape answers with the remaining time of the deadline it sees in context."""

    def __init__(self) -> None:
        self.calls = 0
        self.barrier: asyncio.Barrier | None = None

    async def unary(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self.calls += 1
        if self.barrier is not None:
            await self.barrier.wait()
        return seen()

    async def server_stream(
        self, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        yield seen()
        await asyncio.sleep(0)
        yield seen()

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        self.calls += 1
        async for _ in requests:
            pass
        return seen()

    async def bidi(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        async for _ in requests:
            yield seen()

    async def writer_stream(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> None:
        self.calls += 1
        await context.write(seen())


class CatalogSeeingDeadline(catalog_pb2_grpc.CatalogServiceServicer):
    async def GetItem(
        self, request: catalog_pb2.GetItemRequest, context: aio.ServicerContext[Any, Any]
    ) -> catalog_pb2.Item:
        return catalog_pb2.Item(item_id=request.item_id, name=seen().decode())


class Served(InProcessServer):
    def __init__(self, interceptor: DeadlineInterceptor) -> None:
        self.echo = DeadlineEcho()
        super().__init__(
            grpc.method_handlers_generic_handler(
                "test.Deadline",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(self.echo.unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(self.echo.server_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(self.echo.client_stream),
                    "Bidi": grpc.stream_stream_rpc_method_handler(self.echo.bidi),
                    "Writer": grpc.unary_stream_rpc_method_handler(self.echo.writer_stream),
                },
            ),
            (catalog_pb2_grpc.add_CatalogServiceServicer_to_server, CatalogSeeingDeadline()),
            interceptors=[interceptor],
            reflection=("test.Deadline", "grpc.health.v1.Health"),
        )

    def unary(self, name: str = "Unary") -> Any:
        return self.channel.unary_unary(f"/test.Deadline/{name}")

    def unary_stream(self, name: str) -> Any:
        return self.channel.unary_stream(f"/test.Deadline/{name}")


async def serve(interceptor: DeadlineInterceptor) -> AsyncIterator[Served]:
    async with Served(interceptor) as served:
        yield served


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async for s in serve(DeadlineInterceptor()):
        yield s


def in_budget(answer: bytes, timeout: float) -> bool:
    # grpc encodes the timeout on the wire rounded up, so a few ms more may arrive
    return timeout - 1.0 < float(answer) <= timeout + 0.05


async def test_unary_sees_its_deadline(served: Served) -> None:
    assert in_budget(await served.unary()(b"", timeout=5.0), 5.0)


async def test_without_a_deadline_the_servicer_sees_none(served: Served) -> None:
    assert await served.unary()(b"") == b"none"


async def test_server_streaming_sees_its_deadline_on_every_message(served: Served) -> None:
    answers = [m async for m in served.unary_stream("ServerStream")(b"", timeout=5.0)]
    assert len(answers) == 2
    assert all(in_budget(a, 5.0) for a in answers)
    writer = [m async for m in served.unary_stream("Writer")(b"", timeout=3.0)]
    assert len(writer) == 1 and in_budget(writer[0], 3.0)


async def test_client_and_bidi_streaming_see_their_deadline(served: Served) -> None:
    def requests() -> Iterator[bytes]:
        yield from (b"a", b"b")

    stream_unary = served.channel.stream_unary("/test.Deadline/ClientStream")
    assert in_budget(await stream_unary(requests(), timeout=4.0), 4.0)
    bidi = served.channel.stream_stream("/test.Deadline/Bidi")
    answers = [m async for m in bidi(requests(), timeout=4.0)]
    assert len(answers) == 2 and all(in_budget(a, 4.0) for a in answers)


async def test_concurrent_calls_see_their_own_deadline(served: Served) -> None:
    served.echo.barrier = asyncio.Barrier(2)  # both calls are in the servicer at once
    short, long_ = await asyncio.gather(
        served.unary()(b"", timeout=3.0), served.unary()(b"", timeout=7.0)
    )
    assert in_budget(short, 3.0)
    assert in_budget(long_, 7.0)


async def test_generated_service_health_and_reflection_pass_through(served: Served) -> None:
    catalog = catalog_pb2_grpc.CatalogServiceStub(served.channel)
    item = await catalog.GetItem(catalog_pb2.GetItemRequest(item_id="x"), timeout=5.0)
    assert in_budget(item.name.encode(), 5.0)

    check = await health_pb2_grpc.HealthStub(served.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5.0
    )
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in reflect.ServerReflectionInfo(iter([request]), timeout=5.0):
        names = {s.name for s in reply.list_services_response.service}
        assert "test.Deadline" in names


async def test_a_call_already_late_is_refused_before_the_servicer() -> None:
    async for served in serve(DeadlineInterceptor(clock=TickingClock(step=100.0))):
        for call in (served.unary(), served.unary_stream("ServerStream")):
            with pytest.raises(aio.AioRpcError) as caught:
                result = call(b"", timeout=5.0)
                if hasattr(result, "__aiter__"):
                    [m async for m in result]
                else:
                    await result
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "/test.Deadline/" in (caught.value.details() or "")
            assert "before the server started it" in (caught.value.details() or "")
        assert served.echo.calls == 0
        # a call without a deadline is never late
        assert await served.unary()(b"") == b"none"


class Aborted(Exception):
    pass


class LateContext:
    """A ServicerContext whose call's deadline passed 0.5 s ago (grpc reports it negative)."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float:
        return -0.5

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self.aborted = (code, details)
        raise Aborted


async def test_the_hook_refuses_a_negative_remaining_time_on_the_real_clock() -> None:
    enter = DeadlineInterceptor().hook_for("/pkg.Svc/Method")
    context = LateContext()
    with pytest.raises(Aborted):
        await enter(context)  # type: ignore[arg-type]
    assert context.aborted is not None
    assert context.aborted[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "/pkg.Svc/Method" in context.aborted[1]
    assert current_deadline() is None
