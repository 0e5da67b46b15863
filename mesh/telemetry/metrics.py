"""Prometheus metrics of the mesh: what a scraper needs to see a service's calls and resilience.

A sidecar mesh's proxy exports calls, latencies, retries, breaker and outlier state for free;
a proxyless mesh must export them itself, from the process, or the operator is blind. Each
process serves its own `/metrics` endpoint (its port goes into the Consul service meta, so a
scraper finds it the way callers find the service).

Why a registry per `MeshMetrics` and not prometheus_client's global one: a test (or a process
hosting two meshes) makes a fresh instance and reads exact values back, with nothing left over
from an earlier test. `default_metrics()` is the one process-wide instance the services use;
`reset_default_metrics()` forgets it.

The calls themselves are counted and timed under go-grpc-prometheus's names and labels
(`grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}`, ...; see
mesh/telemetry/rpc_metrics.py), so that existing gRPC dashboards work. What has no convention
(attempts by kind, the retry budget, breakers, outlier ejection, healthy endpoints) follows
Prometheus' naming rules under a `mesh_` prefix: counters end in `_total`, states are a gauge
per state (the OpenMetrics StateSet pattern: 1 for the current state, 0 for the others), and
a method is named by the same `grpc_service` and `grpc_method` labels as the calls'.

The call path calls these methods on every call, so they are cheap: `labels()` (which validates
and hashes its arguments under a lock) runs once per label tuple, and its children are cached
in a dict; a call costs a dict lookup and the children's own increments and observation.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.resilience.breaker import BreakerState
from mesh.telemetry.rpc_metrics import CallType, RpcMetrics, RpcSide, split_method

AttemptKind = Literal["first", "retry", "hedge"]

BREAKER_STATES = tuple(state.value for state in BreakerState)


class _ChildCache:
    """The children of one labelled metric, made once per label tuple."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[Hashable, Any] = {}

    def get(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class MeshMetrics:
    """The mesh's instruments, in a registry of their own (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._client = RpcSide("client", r)
        self._server = RpcSide("server", r)
        self._attempts = Counter(
            "mesh_client_attempts_total",
            "Attempts sent to endpoints: the first of each call, retries and hedges.",
            ("grpc_service", "grpc_method", "service", "kind"),
            registry=r,
        )
        self._attempt_children: dict[tuple[str, str, str], Any] = {}
        self._budget_exhausted = _ChildCache(
            Counter(
                "mesh_retry_budget_exhausted_total",
                "Retries or hedges not sent because the service's retry budget was empty.",
                ("service",),
                registry=r,
            )
        )
        self._breaker_state = _ChildCache(
            Gauge(
                "mesh_circuit_breaker_state",
                "1 for the current state of the service's circuit breaker, 0 for the others.",
                ("service", "state"),
                registry=r,
            )
        )
        self._breaker_transitions = _ChildCache(
            Counter(
                "mesh_circuit_breaker_transitions_total",
                "Changes of state of the service's circuit breaker.",
                ("service", "from_state", "to_state"),
                registry=r,
            )
        )
        self._ejected = _ChildCache(
            Gauge(
                "mesh_ejected_endpoints",
                "Endpoints of the service currently ejected by outlier detection.",
                ("service",),
                registry=r,
            )
        )
        self._ejections = _ChildCache(
            Counter(
                "mesh_ejections_total",
                "Ejections of endpoints of the service by outlier detection.",
                ("service",),
                registry=r,
            )
        )
        self._healthy = _ChildCache(
            Gauge(
                "mesh_healthy_endpoints",
                "Endpoints of the service that discovery reports healthy.",
                ("service",),
                registry=r,
            )
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def client_call_finished(
        self, service: str, method: str, code: grpc.StatusCode, seconds: float
    ) -> None:
        """A call through a mesh channel ended with `code` after `seconds` in all. The call
        path reports calls when they end, so the call's start is counted here too."""
        rpc = self._client.rpc(service, method)
        rpc.started()
        rpc.handled(code, seconds)

    def client_attempt(self, service: str, method: str, kind: AttemptKind) -> None:
        """An attempt of a call was sent: its first, a retry or a hedge."""
        key = (service, method, kind)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self._attempts.labels(
                *split_method(method), service, kind
            )
        child.inc()

    def budget_exhausted(self, service: str) -> None:
        """A retry or hedge was wanted but the service's retry budget had no token."""
        self._budget_exhausted.get(service).inc()

    def breaker_state(self, service: str, state: str) -> None:
        """Show `state` as the current state of the service's breaker (call it when a breaker
        is created: a new breaker is closed without a transition to announce it)."""
        for name in BREAKER_STATES:
            self._breaker_state.get(service, name).set(1 if name == state else 0)

    def breaker_changed(self, service: str, old_state: str, new_state: str) -> None:
        """A listener for `CircuitBreaker.add_listener`: counts the transition and moves the
        state gauge. Takes BreakerState values (a StrEnum) or their strings."""
        self._breaker_transitions.get(service, str(old_state), str(new_state)).inc()
        self.breaker_state(service, str(new_state))

    def ejections_changed(self, service: str, ejected: int) -> None:
        """`ejected` endpoints of the service are ejected now."""
        self._ejected.get(service).set(ejected)

    def ejected(self, service: str) -> None:
        """An endpoint of the service was ejected (once per ejection, re-ejections included)."""
        self._ejections.get(service).inc()

    def healthy_endpoints(self, service: str, n: int) -> None:
        """Discovery reports `n` healthy endpoints for the service."""
        self._healthy.get(service).set(n)

    def server_rpc(
        self, service: str, method: str, grpc_type: CallType | None = None
    ) -> RpcMetrics:
        """The server-side instruments of `method` ("/pkg.Svc/Method") served as `service`,
        made on first use: `started()` when a call begins, `handled()` when it ends.
        `grpc_type`: the call's shape where the caller knows it, else from its descriptor."""
        return self._server.rpc(service, method, grpc_type)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the registry at http://host:port/metrics on a daemon thread; return the port
        bound (port 0 takes a free one). `stop()` stops it."""
        if self._http is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        self._http = prometheus_client.start_http_server(port, host, self.registry)
        return self._http[0].server_port

    @property
    def http_port(self) -> int | None:
        """The port of the metrics HTTP server, or None when it is not running."""
        return None if self._http is None else self._http[0].server_port

    def stop(self) -> None:
        """Stop the metrics HTTP server, if it runs, and close its socket."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join()


_default: MeshMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> MeshMetrics:
    """The process-wide MeshMetrics the services use, made on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = MeshMetrics()
    return _default


def reset_default_metrics() -> None:
    """Forget the process-wide MeshMetrics (stopping its HTTP server); for tests."""
    global _default
    with _default_lock:
        previous, _default = _default, None
    if previous is not None:
        previous.stop()
