"""Fault injection: the policy value, the injector's draws from a scripted RNG, and
FaultInterceptor making one real in-process server slow or failing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.resilience.faults import (
    NO_FAULT,
    FaultDecision,
    FaultInjector,
    FaultPolicy,
    fault_message,
)
from mesh.server.deadline import DeadlineInterceptor
from mesh.server.faults import FaultInterceptor
from mesh.testing import InProcessServer

C = grpc.StatusCode


class ScriptedRng:
    def __init__(self, values: Iterable[float]) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


def no_draws() -> float:
    raise AssertionError("the RNG must not be drawn")


# -- the policy ------------------------------------------------------------------------------


def test_off_by_default() -> None:
    assert not FaultPolicy().active
    injector = FaultInjector(FaultPolicy(), no_draws)
    assert injector.decide() is NO_FAULT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay_seconds": -1.0}, "delay_seconds: must be >= 0"),
        ({"delay_percent": 101.0}, "delay_percent: must be 0..100"),
        ({"abort_percent": -1.0, "abort_code": C.INTERNAL}, "abort_percent: must be 0..100"),
        ({"abort_percent": 10.0}, "abort_code: required"),
        ({"abort_code": C.OK, "abort_percent": 10.0}, "abort_code: must not be OK"),
    ],
)
def test_invalid_policies_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultPolicy(**kwargs)


def test_a_policy_that_cannot_inject_is_not_active() -> None:
    assert not FaultPolicy(delay_seconds=0.0, delay_percent=100).active
    assert not FaultPolicy(delay_seconds=1.0, delay_percent=0).active
    assert not FaultPolicy(abort_code=C.UNAVAILABLE, abort_percent=0).active
    assert FaultPolicy(delay_seconds=1.0, delay_percent=1).active


# -- the injector ----------------------------------------------------------------------------


def test_hundred_percent_needs_no_draw() -> None:
    policy = FaultPolicy(
        delay_seconds=0.2, delay_percent=100, abort_code=C.UNAVAILABLE, abort_percent=100
    )
    assert FaultInjector(policy, no_draws).decide() == FaultDecision(0.2, C.UNAVAILABLE)


def test_delay_percentage_is_honoured() -> None:
    injector = FaultInjector(
        FaultPolicy(delay_seconds=0.1, delay_percent=10), ScriptedRng([0.05, 0.0999, 0.1, 0.9])
    )
    decisions = [injector.decide() for _ in range(4)]
    assert decisions == [FaultDecision(0.1, None)] * 2 + [NO_FAULT] * 2


def test_abort_percentage_and_code() -> None:
    injector = FaultInjector(
        FaultPolicy(abort_code=C.RESOURCE_EXHAUSTED, abort_percent=50), ScriptedRng([0.3, 0.7])
    )
    assert injector.decide() == FaultDecision(0.0, C.RESOURCE_EXHAUSTED)
    assert injector.decide() is NO_FAULT


def test_delay_and_abort_are_drawn_independently_delay_first() -> None:
    policy = FaultPolicy(
        delay_seconds=0.3, delay_percent=50, abort_code=C.INTERNAL, abort_percent=50
    )
    injector = FaultInjector(policy, ScriptedRng([0.9, 0.1, 0.1, 0.9]))
    assert injector.decide() == FaultDecision(0.0, C.INTERNAL)
    assert injector.decide() == FaultDecision(0.3, None)


def test_statistical_share_with_a_seeded_rng() -> None:
    import random

    seeded = random.Random(7)
    injector = FaultInjector(FaultPolicy(abort_code=C.INTERNAL, abort_percent=25), seeded.random)
    aborted = sum(injector.decide().abort is not None for _ in range(10_000))
    assert 2300 < aborted < 2700


def test_fault_message_says_it_is_injected() -> None:
    message = fault_message(C.UNAVAILABLE, "/pkg.Svc/Method")
    assert "injected fault" in message
    assert "UNAVAILABLE" in message and "/pkg.Svc/Method" in message


# -- the interceptor on a real server --------------------------------------------------------


class Served(InProcessServer):
    def __init__(self, interceptors: list[Any]) -> None:
        self.calls = 0
        super().__init__(
            grpc.method_handlers_generic_handler(
                "test.Faulty",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                },
            ),
            interceptors=interceptors,
        )

    async def unary(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        self.calls += 1
        return b"ok:" + request

    async def stream(
        self, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        yield b"one"
        yield b"two"


async def serving(*interceptors: Any) -> AsyncIterator[Served]:
    async with Served(list(interceptors)) as served:
        yield served


async def test_interceptor_delays_every_call() -> None:
    delay = 0.05
    policy = FaultPolicy(delay_seconds=delay, delay_percent=100)
    async for served in serving(FaultInterceptor(policy)):
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await served.channel.unary_unary("/test.Faulty/Unary")(b"x", timeout=5) == b"ok:x"
        assert loop.time() - started >= delay
        started = loop.time()
        stream = served.channel.unary_stream("/test.Faulty/Stream")(b"", timeout=5)
        assert [m async for m in stream] == [b"one", b"two"]
        assert loop.time() - started >= delay


async def test_interceptor_aborts_with_code_and_message_before_the_servicer() -> None:
    policy = FaultPolicy(abort_code=C.UNAVAILABLE, abort_percent=100)
    async for served in serving(FaultInterceptor(policy)):
        with pytest.raises(aio.AioRpcError) as caught:
            await served.channel.unary_unary("/test.Faulty/Unary")(b"", timeout=5)
        assert caught.value.code() is C.UNAVAILABLE
        assert caught.value.details() == fault_message(C.UNAVAILABLE, "/test.Faulty/Unary")

        with pytest.raises(aio.AioRpcError) as caught:
            [m async for m in served.channel.unary_stream("/test.Faulty/Stream")(b"", timeout=5)]
        assert caught.value.code() is C.UNAVAILABLE
        assert caught.value.details() == fault_message(C.UNAVAILABLE, "/test.Faulty/Stream")
        assert served.calls == 0


async def test_interceptor_honours_the_percentage_with_a_scripted_rng() -> None:
    policy = FaultPolicy(abort_code=C.INTERNAL, abort_percent=50)
    async for served in serving(FaultInterceptor(policy, ScriptedRng([0.2, 0.8, 0.4, 0.6]))):
        unary = served.channel.unary_unary("/test.Faulty/Unary")
        codes = []
        for _ in range(4):
            try:
                await unary(b"", timeout=5)
                codes.append(C.OK)
            except aio.AioRpcError as error:
                codes.append(error.code())
        assert codes == [C.INTERNAL, C.OK, C.INTERNAL, C.OK]
        assert served.calls == 2


async def test_health_is_exempt_by_default() -> None:
    policy = FaultPolicy(abort_code=C.UNAVAILABLE, abort_percent=100)
    async for served in serving(FaultInterceptor(policy)):
        reply = await health_pb2_grpc.HealthStub(served.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async for served in serving(FaultInterceptor(policy, exempt=())):
        with pytest.raises(aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(served.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert caught.value.code() is C.UNAVAILABLE


async def test_the_interceptors_sleep_is_injectable() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = FaultPolicy(delay_seconds=30.0, delay_percent=100)
    async for served in serving(FaultInterceptor(policy, sleep=fake_sleep), DeadlineInterceptor()):
        assert await served.channel.unary_unary("/test.Faulty/Unary")(b"", timeout=5) == b"ok:"
        assert slept == [30.0]
