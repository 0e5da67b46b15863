"""The server side of the mesh's metrics: every call a server serves, counted and timed.

The registry and the metric names are mesh/telemetry/'s (metrics.py, rpc_metrics.py); this is
the interceptor that feeds the server-side ones (grpc_server_started_total,
grpc_server_handled_total, grpc_server_handling_seconds, grpc_server_msg_received_total,
grpc_server_msg_sent_total).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from mesh.core.plumbing import PLUMBING_METHOD_PREFIXES
from mesh.server.hooks import BehaviorInterceptor, Exit, Hook
from mesh.telemetry.metrics import MeshMetrics


def final_code(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status code a call ends with, asked from the `finally` of its behavior.

    A code the behavior set (`context.abort()` or `context.set_code()`, even before raising)
    is the one grpc.aio sends. Otherwise the exception being raised through the `finally`
    (`sys.exception()`) tells it: none is OK; a cancellation is the client's, or the deadline's
    when no time is left; any other exception is sent as UNKNOWN.
    """
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    error = sys.exception()
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MetricsServerInterceptor(BehaviorInterceptor):
    """Counts the calls a grpc.aio server serves and times them, per method and status code.

    All four call shapes; a streaming response is timed until its stream ends. Health checks
    and reflection are left out (`exempt`), as they are from tracing. Put it first in the
    server's interceptors, so that calls refused by later interceptors (an expired deadline,
    an injected fault) are counted too. Sync behaviors (run on a thread pool) are not seen.
    """

    def __init__(
        self,
        metrics: MeshMetrics,
        service: str,
        *,
        exempt: tuple[str, ...] = PLUMBING_METHOD_PREFIXES,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._service = service
        self._exempt = exempt
        self._clock = clock

    def hook_for(self, method: str) -> Hook | None:
        if method.startswith(self._exempt):
            return None
        rpc = self._metrics.server_rpc(self._service, method)
        began, handled, clock = rpc.started, rpc.handled, self._clock

        async def measure(context: aio.ServicerContext[Any, Any]) -> Exit:
            began()
            started = clock()

            def done() -> None:
                handled(final_code(context), clock() - started)

            return done

        return measure
