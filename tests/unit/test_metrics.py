"""MeshMetrics read back from its own registry, its HTTP endpoint, and the server interceptor
on a real in-process grpc.aio server (all four call shapes, an aborted call, health left out).
The calls' metrics carry go-grpc-prometheus's names and labels (mesh/telemetry/rpc_metrics.py)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foodmesh.orders.v1 import orders_pb2
from mesh.policy import BreakerPolicy
from mesh.resilience.breaker import BreakerState, CircuitBreaker
from mesh.server.metrics import MetricsServerInterceptor
from mesh.telemetry.metrics import (
    MeshMetrics,
    default_metrics,
    reset_default_metrics,
)
from mesh.telemetry.rpc_metrics import GO_CODE_NAMES, call_type_of, rpc_labels, split_method
from mesh.testing import FakeClock, InProcessServer

CATALOG_GET = "/foodmesh.catalog.v1.CatalogService/GetItem"
CATALOG_LIST = "/foodmesh.catalog.v1.CatalogService/ListItems"
CATALOG = "foodmesh.catalog.v1.CatalogService"


def value(m: MeshMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> MeshMetrics:
    return MeshMetrics()


def test_client_calls_are_counted_by_service_method_and_code(metrics: MeshMetrics) -> None:
    for _ in range(3):
        metrics.client_call_finished("catalog", CATALOG_GET, grpc.StatusCode.OK, 0.002)
    metrics.client_call_finished("catalog", CATALOG_GET, grpc.StatusCode.UNAVAILABLE, 0.02)
    metrics.client_call_finished("catalog", CATALOG_LIST, grpc.StatusCode.OK, 0.003)
    metrics.client_call_finished("orders", CATALOG_GET, grpc.StatusCode.OK, 0.004)

    handled = "grpc_client_handled_total"
    get, listed = rpc_labels("catalog", CATALOG_GET), rpc_labels("catalog", CATALOG_LIST)
    assert get == {
        "service": "catalog",
        "grpc_type": "unary",
        "grpc_service": CATALOG,
        "grpc_method": "GetItem",
    }
    assert value(metrics, handled, grpc_code="OK", **get) == 3
    assert value(metrics, handled, grpc_code="Unavailable", **get) == 1
    assert value(metrics, handled, grpc_code="OK", **listed) == 1
    assert value(metrics, handled, grpc_code="OK", **rpc_labels("orders", CATALOG_GET)) == 1
    assert value(metrics, handled, grpc_code="Unknown", **listed) is None
    # started when they end (the call path reports calls then); a unary request is a message
    # sent, a unary response one received when the call succeeds
    assert value(metrics, "grpc_client_started_total", **get) == 4
    assert value(metrics, "grpc_client_msg_sent_total", **get) == 4
    assert value(metrics, "grpc_client_msg_received_total", **get) == 3


def test_client_durations_fill_the_histogram(metrics: MeshMetrics) -> None:
    for seconds in (0.0004, 0.002, 0.002, 0.3, 12.0):
        metrics.client_call_finished("catalog", CATALOG_GET, grpc.StatusCode.OK, seconds)
    name = "grpc_client_handling_seconds"
    labels = rpc_labels("catalog", CATALOG_GET)
    assert value(metrics, f"{name}_count", **labels) == 5
    assert value(metrics, f"{name}_sum", **labels) == pytest.approx(12.3044)
    assert value(metrics, f"{name}_bucket", le="0.0005", **labels) == 1
    assert value(metrics, f"{name}_bucket", le="0.0025", **labels) == 3
    assert value(metrics, f"{name}_bucket", le="0.5", **labels) == 4
    assert value(metrics, f"{name}_bucket", le="10.0", **labels) == 4
    assert value(metrics, f"{name}_bucket", le="+Inf", **labels) == 5


def test_every_status_code_has_its_go_name(metrics: MeshMetrics) -> None:
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    assert GO_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert GO_CODE_NAMES[grpc.StatusCode.DEADLINE_EXCEEDED] == "DeadlineExceeded"
    for code in grpc.StatusCode:
        metrics.client_call_finished("catalog", CATALOG_GET, code, 0.001)
    labels = rpc_labels("catalog", CATALOG_GET)
    for code, name in GO_CODE_NAMES.items():
        assert value(metrics, "grpc_client_handled_total", grpc_code=name, **labels) == 1, code


def test_method_names_split_as_go_grpc_prometheus_splits_them() -> None:
    assert split_method("/pkg.v1.Svc/Method") == ("pkg.v1.Svc", "Method")
    assert split_method("pkg.Svc/Method") == ("pkg.Svc", "Method")
    assert split_method("nonsense") == ("unknown", "unknown")


def test_the_call_type_comes_from_the_descriptor_or_the_caller(metrics: MeshMetrics) -> None:
    assert call_type_of(CATALOG_GET) == "unary"
    watch = f"/{orders_pb2.DESCRIPTOR.package}.OrderService/WatchOrder"  # its module imported
    assert call_type_of(watch) == "server_stream"
    assert call_type_of("/grpc.health.v1.Health/Watch") == "server_stream"
    assert call_type_of("/no.Such/Method") == "unary"
    for method, grpc_type in SHAPES.items():
        assert call_type_of(f"/{ECHO}/{method}") == grpc_type
    # a caller that knows the shape (a generic handler has no descriptor) says it
    told = metrics.server_rpc("gateway", "/no.Such/Watch", "server_stream")
    told.started()
    told.handled(grpc.StatusCode.OK, 0.01)
    labels = rpc_labels("gateway", "/no.Such/Watch", "server_stream")
    assert value(metrics, "grpc_server_started_total", **labels) == 1
    assert value(metrics, "grpc_server_msg_received_total", **labels) == 1
    assert value(metrics, "grpc_server_msg_sent_total", **labels) is None  # a stream's


def test_attempts_by_kind_and_budget_exhaustion(metrics: MeshMetrics) -> None:
    metrics.client_attempt("catalog", CATALOG_GET, "first")
    metrics.client_attempt("catalog", CATALOG_GET, "retry")
    metrics.client_attempt("catalog", CATALOG_GET, "retry")
    metrics.client_attempt("catalog", CATALOG_GET, "hedge")
    metrics.budget_exhausted("catalog")
    metrics.budget_exhausted("catalog")

    attempts = "mesh_client_attempts_total"
    get = {"service": "catalog", "grpc_service": CATALOG, "grpc_method": "GetItem"}
    assert value(metrics, attempts, kind="first", **get) == 1
    assert value(metrics, attempts, kind="retry", **get) == 2
    assert value(metrics, attempts, kind="hedge", **get) == 1
    assert value(metrics, "mesh_retry_budget_exhausted_total", service="catalog") == 2
    assert value(metrics, "mesh_retry_budget_exhausted_total", service="orders") is None


def breaker_states(metrics: MeshMetrics, service: str) -> dict[str, float | None]:
    return {
        s.value: value(metrics, "mesh_circuit_breaker_state", service=service, state=s.value)
        for s in BreakerState
    }


def test_breaker_state_and_transitions_follow_a_real_breaker(metrics: MeshMetrics) -> None:
    clock = FakeClock(1000.0)
    policy = BreakerPolicy(minimum_calls=2, open_time=5.0, half_open_calls=1)
    breaker = CircuitBreaker("catalog", policy, clock)
    breaker.add_listener(metrics.breaker_changed)
    metrics.breaker_state("catalog", breaker.state)
    assert breaker_states(metrics, "catalog") == {"closed": 1, "open": 0, "half_open": 0}

    breaker.record(False)
    breaker.record(False)  # closed -> open
    assert breaker_states(metrics, "catalog") == {"closed": 0, "open": 1, "half_open": 0}
    clock.advance(5.0)
    assert breaker.allow()  # open -> half_open
    assert breaker_states(metrics, "catalog") == {"closed": 0, "open": 0, "half_open": 1}
    breaker.record(False)  # half_open -> open
    clock.advance(5.0)
    assert breaker.allow()  # open -> half_open
    breaker.record(True)  # half_open -> closed
    assert breaker_states(metrics, "catalog") == {"closed": 1, "open": 0, "half_open": 0}

    def transitions(old: str, new: str) -> float | None:
        return value(
            metrics,
            "mesh_circuit_breaker_transitions_total",
            service="catalog",
            from_state=old,
            to_state=new,
        )

    assert transitions("closed", "open") == 1
    assert transitions("open", "half_open") == 2
    assert transitions("half_open", "open") == 1
    assert transitions("half_open", "closed") == 1
    assert transitions("closed", "half_open") is None


def test_ejections_and_healthy_endpoints(metrics: MeshMetrics) -> None:
    metrics.healthy_endpoints("catalog", 3)
    metrics.ejected("catalog")
    metrics.ejections_changed("catalog", 1)
    metrics.ejected("catalog")
    metrics.ejections_changed("catalog", 2)
    metrics.ejections_changed("catalog", 1)
    metrics.healthy_endpoints("catalog", 2)

    assert value(metrics, "mesh_healthy_endpoints", service="catalog") == 2
    assert value(metrics, "mesh_ejected_endpoints", service="catalog") == 1
    assert value(metrics, "mesh_ejections_total", service="catalog") == 2


def test_each_instance_has_its_own_registry() -> None:
    first, second = MeshMetrics(), MeshMetrics()
    first.budget_exhausted("catalog")
    assert value(first, "mesh_retry_budget_exhausted_total", service="catalog") == 1
    assert value(second, "mesh_retry_budget_exhausted_total", service="catalog") is None


def test_default_metrics_is_one_instance_until_reset() -> None:
    reset_default_metrics()
    try:
        shared = default_metrics()
        assert default_metrics() is shared
        shared.budget_exhausted("catalog")
        reset_default_metrics()
        assert default_metrics() is not shared
        assert value(default_metrics(), "mesh_retry_budget_exhausted_total", service="x") is None
    finally:
        reset_default_metrics()


def every_instrument_used() -> MeshMetrics:
    m = MeshMetrics()
    m.client_call_finished("s", "/p.S/M", grpc.StatusCode.OK, 0.001)
    served = m.server_rpc("s", "/p.S/M")
    served.started()
    served.handled(grpc.StatusCode.OK, 0.001)
    m.client_attempt("s", "/p.S/M", "first")
    m.budget_exhausted("s")
    m.breaker_changed("s", BreakerState.CLOSED, BreakerState.OPEN)
    m.ejected("s")
    m.ejections_changed("s", 1)
    m.healthy_endpoints("s", 2)
    return m


def test_names_follow_prometheus_conventions() -> None:
    families = list(every_instrument_used().registry.collect())
    assert len(families) == 17
    assert {f.name for f in families if f.name.startswith("grpc_")} == {
        f"grpc_{side}_{name}"
        for side in ("server", "client")
        for name in ("started", "handled", "handling_seconds", "msg_received", "msg_sent")
    }
    for family in families:
        assert re.fullmatch(r"(mesh|grpc)_[a-z][a-z0-9_]*", family.name), family.name
        samples = {s.name for s in family.samples}
        if family.type == "counter":
            assert f"{family.name}_total" in samples, family.name
        else:
            assert not any(name.endswith("_total") for name in samples), family.name
        if family.type == "histogram" or "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name
        assert family.documentation, family.name


def test_render_and_the_http_endpoint_serve_the_text_format() -> None:
    m = every_instrument_used()
    assert b'mesh_retry_budget_exhausted_total{service="s"} 1.0' in m.render()
    port = m.start_http_server("127.0.0.1", 0)
    try:
        assert port > 0 and m.http_port == port
        with pytest.raises(RuntimeError):
            m.start_http_server()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain")
            body = answer.read()
        assert b"# TYPE grpc_client_handled_total counter" in body
        assert (
            b'grpc_client_handled_total{grpc_code="OK",grpc_method="M",grpc_service="p.S",'
            b'grpc_type="unary",service="s"} 1.0'
        ) in body
    finally:
        m.stop()
    assert m.http_port is None
    m.stop()  # stopping twice is harmless
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


# --- the server interceptor, on a real server ---


async def unary(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"bad":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    if request == b"boom":
        raise RuntimeError("a bug")
    if request == b"missing":
        context.set_code(grpc.StatusCode.NOT_FOUND)
    if request == b"slow":
        await asyncio.sleep(10)
    return request


async def server_stream(
    request: bytes, context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield request
    if request == b"bad":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "half way")
    yield request


async def client_stream(
    requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
) -> bytes:
    return b"".join([r async for r in requests])


async def bidi(
    requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r


ECHO = "meshtest.metrics.Echo"
SHAPES = {
    "Unary": "unary",
    "ServerStream": "server_stream",
    "ClientStream": "client_stream",
    "Bidi": "bidi_stream",
}


def _describe_echo() -> None:
    """Echo's service in the default pool, as a generated module would put it there: the
    metrics learn each method's call type from it."""
    file = descriptor_pb2.FileDescriptorProto(
        name="meshtest/metrics/echo.proto", package="meshtest.metrics", syntax="proto3"
    )
    file.message_type.add(name="Bytes")
    service = file.service.add(name="Echo")
    for method, grpc_type in SHAPES.items():
        service.method.add(
            name=method,
            input_type=".meshtest.metrics.Bytes",
            output_type=".meshtest.metrics.Bytes",
            client_streaming=grpc_type in ("client_stream", "bidi_stream"),
            server_streaming=grpc_type in ("server_stream", "bidi_stream"),
        )
    descriptor_pool.Default().AddSerializedFile(file.SerializeToString())


_describe_echo()


class Served(InProcessServer):
    def __init__(self, metrics: MeshMetrics) -> None:
        self.metrics = metrics
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        }
        super().__init__(
            grpc.method_handlers_generic_handler(ECHO, handlers),
            interceptors=[MetricsServerInterceptor(metrics, "echo")],
        )

    def labels(self, method: str) -> dict[str, str]:
        return rpc_labels("echo", f"/{ECHO}/{method}", SHAPES[method])

    def calls(self, method: str, code: str) -> float | None:
        return value(
            self.metrics, "grpc_server_handled_total", grpc_code=code, **self.labels(method)
        )

    def counted(self, name: str, method: str) -> float | None:
        return value(self.metrics, name, **self.labels(method))

    def durations(self, method: str) -> float | None:
        return self.counted("grpc_server_handling_seconds_count", method)

    async def eventually(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll: the server counts a call when its behavior ends, which may be after the
        client has seen the status (abort sends it first)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with Served(MeshMetrics()) as s:
        yield s


async def test_server_counts_ok_and_aborted_unary_calls(served: Served) -> None:
    call = served.channel.unary_unary(f"/{ECHO}/Unary")
    assert await call(b"hi") == b"hi"
    assert await call(b"hi") == b"hi"
    with pytest.raises(aio.AioRpcError) as raised:
        await call(b"bad")
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    await served.eventually(lambda: served.calls("Unary", "InvalidArgument") == 1)
    assert served.calls("Unary", "OK") == 2
    assert served.durations("Unary") == 3
    assert served.counted("grpc_server_started_total", "Unary") == 3
    assert served.counted("grpc_server_msg_received_total", "Unary") == 3
    assert served.counted("grpc_server_msg_sent_total", "Unary") == 2


async def test_server_counts_what_the_client_sees_for_errors(served: Served) -> None:
    call = served.channel.unary_unary(f"/{ECHO}/Unary")
    with pytest.raises(aio.AioRpcError) as raised:
        await call(b"boom")
    assert raised.value.code() is grpc.StatusCode.UNKNOWN
    await served.eventually(lambda: served.calls("Unary", "Unknown") == 1)
    with pytest.raises(aio.AioRpcError) as raised:
        await call(b"missing")
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    await served.eventually(lambda: served.calls("Unary", "NotFound") == 1)
    with pytest.raises(aio.AioRpcError) as raised:
        await call(b"slow", timeout=0.2)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await served.eventually(lambda: served.calls("Unary", "DeadlineExceeded") == 1)
    slow = call(b"slow")
    await asyncio.sleep(0.1)
    slow.cancel()
    await served.eventually(lambda: served.calls("Unary", "Canceled") == 1)


async def test_server_counts_every_call_shape(served: Served) -> None:
    ch = served.channel
    assert [r async for r in ch.unary_stream(f"/{ECHO}/ServerStream")(b"a")] == [b"a", b"a"]
    with pytest.raises(aio.AioRpcError) as raised:
        _ = [r async for r in ch.unary_stream(f"/{ECHO}/ServerStream")(b"bad")]
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert await ch.stream_unary(f"/{ECHO}/ClientStream")(iter([b"a", b"b"])) == b"ab"
    assert [r async for r in ch.stream_stream(f"/{ECHO}/Bidi")(iter([b"x", b"y"]))] == [
        b"x",
        b"y",
    ]

    await served.eventually(lambda: served.calls("ServerStream", "FailedPrecondition") == 1)
    await served.eventually(lambda: served.calls("Bidi", "OK") == 1)
    assert served.calls("ServerStream", "OK") == 1
    assert served.calls("ClientStream", "OK") == 1
    assert served.durations("ServerStream") == 2
    assert served.counted("grpc_server_started_total", "ServerStream") == 2
    assert served.counted("grpc_server_started_total", "ClientStream") == 1
    assert served.counted("grpc_server_started_total", "Bidi") == 1
    # the unary side's message of each call; a stream's messages are not counted
    received, sent = "grpc_server_msg_received_total", "grpc_server_msg_sent_total"
    assert served.counted(received, "ServerStream") == 2
    assert served.counted(sent, "ServerStream") is None
    assert served.counted(received, "ClientStream") is None
    assert served.counted(sent, "ClientStream") == 1
    assert served.counted(received, "Bidi") is None and served.counted(sent, "Bidi") is None


async def test_health_checks_are_not_counted(served: Served) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    await stub.Check(health_pb2.HealthCheckRequest())
    assert await served.channel.unary_unary(f"/{ECHO}/Unary")(b"x") == b"x"
    await served.eventually(lambda: served.calls("Unary", "OK") == 1)
    names = {
        s.labels.get("grpc_service")
        for family in served.metrics.registry.collect()
        for s in family.samples
    }
    assert "grpc.health.v1.Health" not in names and ECHO in names
