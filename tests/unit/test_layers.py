"""The layer order is written once (mesh/layers.py) and the code follows it: which refusal a
call gets when several layers would refuse it, how a refusal unwinds the layers before it,
the server's interceptor order, and the README's picture being that data's rendering."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider

from mesh import layers
from mesh.client.admission import Admission, BreakerGate, BulkheadGate
from mesh.client.channel import MeshChannel
from mesh.core.outcome import Outcome
from mesh.discovery.endpoint import Endpoint
from mesh.policy import BreakerPolicy, BulkheadPolicy, MethodPolicy, ServicePolicy
from mesh.resilience.breaker import BreakerState, CircuitBreaker
from mesh.resilience.bulkhead import ConcurrencyLimit
from mesh.resilience.faults import FaultPolicy
from mesh.server.deadline import DeadlineInterceptor
from mesh.server.faults import FaultInterceptor
from mesh.server.mesh_server import ServerConfig, server_interceptors
from mesh.server.metrics import MetricsServerInterceptor
from mesh.telemetry.metrics import MeshMetrics
from mesh.telemetry.tracing import Tracing
from mesh.testing import FakeClock, MockChannel, MockContext, StaticResolver, rpc_error

C = grpc.StatusCode
README = Path(__file__).resolve().parents[2] / "README.md"
METHOD = "/test.Svc/Get"


def test_the_readme_shows_the_layers_as_the_code_has_them() -> None:
    assert f"```\n{layers.render()}\n```" in README.read_text()


def test_admission_layers_are_client_layers_in_their_order() -> None:
    names = [layer.name for layer in layers.CLIENT_LAYERS]
    assert list(layers.ADMISSION) == sorted(layers.ADMISSION, key=names.index)
    assert layers.ADMISSION == ("deadline", "faults", "breaker", "bulkhead", "retry | hedge")


class Dependency:
    """One endpoint, answered by a MockChannel: `hold` parks calls, `fail` fails them."""

    def __init__(self) -> None:
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail = False

    async def get(self, request: bytes, context: MockContext) -> bytes:
        await self.hold.wait()
        if self.fail:
            raise rpc_error(C.UNAVAILABLE, "down")
        return b"ok"

    def channel(self, policy: ServicePolicy) -> MeshChannel:
        mock = MockChannel(methods={METHOD: self.get})

        def factory(endpoint: Endpoint) -> aio.Channel:
            return mock

        return MeshChannel(
            "svc", StaticResolver({"svc": ["10.0.0.1:1"]}), policy=policy, channel_factory=factory
        )


def policy(*, fault: FaultPolicy | None = None, max_concurrent: int = 1024) -> ServicePolicy:
    method = MethodPolicy(idempotent=False, fault=fault or FaultPolicy())
    return ServicePolicy(
        defaults=method,
        breaker=BreakerPolicy(minimum_calls=1, failure_rate_threshold=1.0, open_time=60),
        bulkhead=BulkheadPolicy(max_concurrent=max_concurrent),
    )


async def refusal(channel: MeshChannel, timeout: float | None = 5.0) -> tuple[C, str]:
    with pytest.raises(aio.AioRpcError) as caught:
        await channel.unary_unary(METHOD)(b"", timeout=timeout)
    return caught.value.code(), caught.value.details() or ""


async def open_the_breaker(dependency: Dependency, channel: MeshChannel) -> None:
    dependency.fail = True
    await refusal(channel)
    dependency.fail = False
    assert channel.upstream.breaker.state is BreakerState.OPEN


async def test_no_time_left_is_refused_before_a_fault_is_drawn() -> None:
    injected = FaultPolicy(abort_code=C.INTERNAL, abort_percent=100)
    async with Dependency().channel(policy(fault=injected)) as channel:
        code, _ = await refusal(channel, timeout=0)
        assert code is C.DEADLINE_EXCEEDED
        code, details = await refusal(channel)
        assert code is C.INTERNAL and "injected fault" in details


async def test_a_fault_comes_before_the_open_breaker() -> None:
    dependency = Dependency()
    async with dependency.channel(policy()) as channel:
        await open_the_breaker(dependency, channel)
        code, details = await refusal(channel)
        assert code is C.UNAVAILABLE and "circuit for service 'svc' is open" in details
    injected = FaultPolicy(abort_code=C.INTERNAL, abort_percent=100)
    faulty = policy(fault=injected)
    async with dependency.channel(faulty) as channel:
        # a breaker is opened through the calls it admits: open it with the fault off first
        upstream = channel.upstream
        upstream.breaker.record(False)
        assert upstream.breaker.state is BreakerState.OPEN
        code, details = await refusal(channel)
        assert code is C.INTERNAL and "injected fault" in details


async def test_the_open_breaker_comes_before_the_full_bulkhead() -> None:
    dependency = Dependency()
    async with dependency.channel(policy(max_concurrent=1)) as channel:
        dependency.hold.clear()
        in_flight = asyncio.ensure_future(channel.unary_unary(METHOD)(b"", timeout=5))
        assert channel.upstream.bulkhead.in_flight == 1  # admitted when the stub returned
        code, details = await refusal(channel)
        assert code is C.RESOURCE_EXHAUSTED and "limit 1" in details
        channel.upstream.breaker.record(False)  # opens: minimum_calls=1, threshold 100 %
        code, details = await refusal(channel)
        assert code is C.UNAVAILABLE and "is open" in details
        dependency.hold.set()
        assert await in_flight == b"ok"


def test_a_refusal_gives_back_what_the_layers_before_it_took() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "svc", BreakerPolicy(minimum_calls=1, open_time=1, half_open_calls=1), clock
    )
    breaker.record(False)
    clock.advance(1)
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()  # the bulkhead is full
    admission = Admission([BreakerGate(breaker), BulkheadGate("svc", limit)])
    refused = admission.admit(deadline=10.0)
    assert refused is not None and refused.code() is C.RESOURCE_EXHAUSTED
    assert breaker.state is BreakerState.HALF_OPEN
    # the half-open probe slot the breaker gave was handed back: the next call may probe
    limit.release()
    assert admission.admit(deadline=10.0) is None
    admission.release(Outcome.SUCCESS)
    assert breaker.state is BreakerState.CLOSED and limit.in_flight == 0


def test_the_server_installs_its_interceptors_in_the_layers_order() -> None:
    provider = TracerProvider()
    tracing = Tracing(provider, provider.get_tracer("test"))
    faulty = ServerConfig(
        "svc", fault=FaultPolicy(abort_code=C.UNAVAILABLE, abort_percent=10), register=False
    )
    every = server_interceptors(faulty, tracing, MeshMetrics())
    assert [type(i) for i in every[:1] + every[2:]] == [
        MetricsServerInterceptor,
        DeadlineInterceptor,
        FaultInterceptor,
    ]
    assert "opentelemetry" in type(every[1]).__module__
    assert [layer.name for layer in layers.SERVER_LAYERS] == [
        "metrics",
        "tracing",
        "deadline",
        "faults",
    ]
    plain = server_interceptors(ServerConfig("svc", register=False))
    assert [type(i) for i in plain] == [DeadlineInterceptor]
