"""The calls' metrics under go-grpc-prometheus's names, so that the gRPC dashboards users
already have read a mesh service as they read a Go one.

go-grpc-prometheus (grpc-ecosystem; go-grpc-middleware's prometheus provider keeps its names)
is the convention those dashboards are written against: per side (`server`, `client`)

    grpc_<side>_started_total       {grpc_type, grpc_service, grpc_method}
    grpc_<side>_handled_total       {grpc_type, grpc_service, grpc_method, grpc_code}
    grpc_<side>_handling_seconds    {grpc_type, grpc_service, grpc_method}   (histogram)
    grpc_<side>_msg_received_total  {grpc_type, grpc_service, grpc_method}
    grpc_<side>_msg_sent_total      {grpc_type, grpc_service, grpc_method}

with `grpc_type` one of unary, client_stream, server_stream, bidi_stream, "/pkg.Svc/Method"
split into `grpc_service` ("pkg.Svc") and `grpc_method` ("Method"), and `grpc_code` in Go's
spelling ("OK", "Canceled", "DeadlineExceeded"), which is not Python's enum name. The mesh adds
one label, `service`: the Consul service called (client) or serving (server), which a gRPC
service name does not tell (the gateway serves every service's methods).

Messages are counted as go-grpc-prometheus counts the unary side of a call: a unary request is
one message per call started (received by the server, sent by the client), a unary response
one per call ended OK. So they are read from the started and handled counters when scraped
(`UnaryMessages`), not counted again on every call. The messages of a stream are not counted:
the call path does not report them.

The call type comes from the caller when it knows it, else from the method's descriptor in
the default pool (there once its generated `_pb2` module is imported; a generic handler's
methods, such as the gateway's, are not), else "unary".

Cost per call: what is per method (the split, the call type, the labelled children) is
resolved once, into an `RpcMetrics`; a call then costs one increment at its start and, at its
end, one dict lookup of the status code's child, its increment and one observation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.resilience.retry.policy import method_descriptor_for

CallType = Literal["unary", "client_stream", "server_stream", "bidi_stream"]
Side = Literal["server", "client"]

RPC_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Histogram bounds in seconds: from a sub-millisecond local call to a 10 s timeout."""

GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
"""`grpc_code` values: Go's `codes.Code.String()`, as Go services label their calls."""

LABELS = ("grpc_type", "grpc_service", "grpc_method", "service")

_WHOSE = {"server": "served by this process", "client": "made by this process"}

UNARY_REQUEST: frozenset[CallType] = frozenset({"unary", "server_stream"})
UNARY_RESPONSE: frozenset[CallType] = frozenset({"unary", "client_stream"})


def call_type(request_streaming: bool, response_streaming: bool) -> CallType:
    """The `grpc_type` of a method whose request and response stream or not."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


def call_type_of(full_method: str) -> CallType:
    """The `grpc_type` of "/pkg.Svc/Method" from its descriptor in the default pool;
    "unary" when the pool does not have it."""
    descriptor = method_descriptor_for(full_method)
    if descriptor is None:
        return "unary"
    return call_type(descriptor.client_streaming, descriptor.server_streaming)


def split_method(full_method: str) -> tuple[str, str]:
    """("pkg.Svc", "Method") from "/pkg.Svc/Method"; ("unknown", "unknown") from a name
    without a slash, as go-grpc-prometheus splits it."""
    service, sep, method = full_method.removeprefix("/").partition("/")
    return (service, method) if sep else ("unknown", "unknown")


def rpc_labels(service: str, method: str, grpc_type: CallType = "unary") -> dict[str, str]:
    """The labels (LABELS, in order) of the grpc_server_* / grpc_client_* samples of
    `method` ("/pkg.Svc/Method") served as, or called on, `service`."""
    grpc_service, grpc_method = split_method(method)
    return {
        "grpc_type": grpc_type,
        "grpc_service": grpc_service,
        "grpc_method": grpc_method,
        "service": service,
    }


class RpcSide:
    """The instruments of one side of calls (started, handled, handling time, and the
    messages read from them), and an `RpcMetrics` per method."""

    def __init__(self, side: Side, registry: CollectorRegistry) -> None:
        self.side = side
        whose = _WHOSE[side]
        self.started = Counter(
            f"grpc_{side}_started_total", f"RPCs started, {whose}.", LABELS, registry=registry
        )
        self.handled = Counter(
            f"grpc_{side}_handled_total",
            f"RPCs completed, {whose}, by status code (Go's name), whatever their outcome.",
            (*LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            f"grpc_{side}_handling_seconds",
            {
                "server": "Time the server spent on RPCs, from the behavior's start to its end.",
                "client": "Duration of RPCs made through mesh channels, retries and hedges "
                "included.",
            }[side],
            LABELS,
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        registry.register(UnaryMessages(self))
        self._rpcs: dict[tuple[str, str], RpcMetrics] = {}

    def rpc(self, service: str, method: str, grpc_type: CallType | None = None) -> RpcMetrics:
        """The instruments of `method` ("/pkg.Svc/Method") of `service`, made once."""
        rpc = self._rpcs.get((service, method))
        if rpc is None:
            rpc = self._rpcs[service, method] = RpcMetrics(
                self, service, method, grpc_type or call_type_of(method)
            )
        return rpc


class RpcMetrics:
    """One method's labelled children on one side: `started()` when a call starts,
    `handled()` when it ends."""

    __slots__ = ("_by_code", "_handled", "_labels", "_seconds", "started")

    def __init__(self, side: RpcSide, service: str, method: str, grpc_type: CallType) -> None:
        labels = tuple(rpc_labels(service, method, grpc_type).values())
        self.started: Callable[[], None] = side.started.labels(*labels).inc
        """A call of the method started."""
        self._seconds = side.handling_seconds.labels(*labels)
        self._handled = side.handled
        self._labels = labels
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        """A call of the method ended with `code` after `seconds`."""
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self._labels, GO_CODE_NAMES[code])
        child.inc()
        self._seconds.observe(seconds)


class UnaryMessages(Collector):
    """grpc_<side>_msg_received_total and grpc_<side>_msg_sent_total, read from the side's
    started and handled counters at each scrape (see the module docstring)."""

    def __init__(self, side: RpcSide) -> None:
        self._side = side

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        side = self._side.side
        whose = _WHOSE[side]
        return (
            CounterMetricFamily(
                f"grpc_{side}_msg_received",
                f"Messages received on RPCs {whose} (a unary side's; a stream's are not counted).",
                labels=LABELS,
            ),
            CounterMetricFamily(
                f"grpc_{side}_msg_sent",
                f"Messages sent on RPCs {whose} (a unary side's; a stream's are not counted).",
                labels=LABELS,
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        side = self._side
        received, sent = self._families()
        requests, responses = (received, sent) if side.side == "server" else (sent, received)
        for family in side.started.collect():
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_total") and labels["grpc_type"] in UNARY_REQUEST:
                    requests.add_metric([labels[name] for name in LABELS], sample.value)
        for family in side.handled.collect():
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name.endswith("_total")
                    and labels["grpc_code"] == "OK"
                    and labels["grpc_type"] in UNARY_RESPONSE
                ):
                    responses.add_metric([labels[name] for name in LABELS], sample.value)
        yield received
        yield sent
