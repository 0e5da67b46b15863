"""What the gateway tells its operators: an access log line per call, and its own metrics.

Calls per route (method) and status code, and their durations, are the mesh's server metrics
(`grpc_server_handled_total{service="gateway"}`); the gateway adds what only it knows:

    foodmesh_gateway_auth_total{method, outcome}          ok, anonymous, missing, expired, ...
    foodmesh_gateway_rate_limit_total{method, decision}   allowed, limited
    foodmesh_gateway_rate_limit_store_errors_total        Redis unreachable: let through
    foodmesh_gateway_messages_decoded_total{protocol}     parsed messages (HTTP/JSON only)
    foodmesh_gateway_routes                               gRPC services in the route table

The access log (logger `meshkit.gateway.access`, one line per call, with the trace id like
every log line of the mesh) gives the request id, consumer, route, code, duration, and the
auth and rate-limit outcomes. The AccessLogInterceptor is the outermost of the gateway's
layers: it makes the call's record (calls.py) that the others fill in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.core.plumbing import PLUMBING_METHOD_PREFIXES
from mesh.server.hooks import BehaviorInterceptor, Exit, Hook
from mesh.server.metrics import final_code
from meshkit.gateway.calls import current_call, new_call

access_log = logging.getLogger("meshkit.gateway.access")


class GatewayMetrics:
    """The gateway's own instruments, in the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._auth = Counter(
            "foodmesh_gateway_auth",
            "Calls by what authentication found: ok, anonymous, or why a token was refused.",
            ("method", "outcome"),
            registry=registry,
        )
        self._rate = Counter(
            "foodmesh_gateway_rate_limit",
            "Rate-limit decisions: allowed or limited.",
            ("method", "decision"),
            registry=registry,
        )
        self.store_errors = Counter(
            "foodmesh_gateway_rate_limit_store_errors",
            "Rate-limit decisions the shared store (Redis) could not make: the call was let "
            "through (fail open).",
            registry=registry,
        )
        self.decoded = Counter(
            "foodmesh_gateway_messages_decoded",
            "Messages the gateway parsed: HTTP/JSON's requests and responses only; the gRPC "
            "path forwards bytes and parses none.",
            ("protocol",),
            registry=registry,
        )
        self.routes = Gauge(
            "foodmesh_gateway_routes",
            "gRPC services in the gateway's route table.",
            registry=registry,
        )

    def auth_outcome(self, method: str, outcome: str) -> None:
        self._auth.labels(method, outcome).inc()

    def rate_decision(self, method: str, allowed: bool) -> None:
        self._rate.labels(method, "allowed" if allowed else "limited").inc()


class AccessLogInterceptor(BehaviorInterceptor):
    """Makes each call's record and logs one line when the call ends (health checks and
    reflection left out, as from the mesh's metrics)."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self._clock = clock

    def hook_for(self, method: str) -> Hook | None:
        if method.startswith(PLUMBING_METHOD_PREFIXES):
            return None
        clock = self._clock

        async def enter(context: aio.ServicerContext[Any, Any]) -> Exit:
            started = clock()
            call = new_call(context)
            current_call.set(call)

            def done() -> None:
                access_log.info(
                    "%s rid=%s consumer=%s code=%s %.1fms auth=%s rate_limit=%s",
                    method,
                    call.request_id,
                    call.consumer,
                    final_code(context).name,
                    (clock() - started) * 1000,
                    call.auth,
                    call.rate_limit,
                )

            return done

        return enter
