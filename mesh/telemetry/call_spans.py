"""The mesh's own spans: one per logical call on a MeshChannel, one child per attempt.

A gRPC client span shows one HTTP/2 call; it cannot show that three of them were one call,
which endpoint each went to, why a second one was sent, or that the breaker refused the call.
These spans do. The call span (kind INTERNAL) carries OpenTelemetry's RPC attributes
(`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`) and events for refusals
(open circuit, empty retry budget). Each attempt span is the gRPC CLIENT span of that attempt,
as OpenTelemetry's conventions ask of a client that resends (one CLIENT span per attempt, under
the logical operation): the same RPC attributes, the endpoint (`server.address`,
`server.port`), its number, whether it is a retry or a hedge, the backoff waited before it and
the breaker's state. The mesh injects its context into the attempt's metadata (W3C
`traceparent` unless OTEL_PROPAGATORS says otherwise), so the server's span is its child.

Why the mesh makes the client span itself instead of putting opentelemetry-instrumentation-
grpc's client interceptor on its sub-channels, as it first did: that interceptor's span
repeated what the attempt span already says, one more span per call to build, batch and export,
and grpc.aio's interceptor machinery costs more per call than the rest of the call path
(measured: scripts/bench_overhead.py --tracing on; README, "Measured"). An unsampled call makes
no attempt spans at all: its call span's context (sampled flag off) goes onward instead, so
the servers downstream drop the trace too, and an unsampled call costs one span, as with the
stock interceptor.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode


class CallSpans:
    """The span of one call and the spans of its attempts."""

    __slots__ = ("_name", "_parent", "_recording", "_rpc", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, service: str, full_method: str) -> None:
        rpc_service, _, rpc_method = full_method.lstrip("/").partition("/")
        self._tracer = tracer
        self._name = f"{rpc_service}/{rpc_method}"
        span = tracer.start_span(self._name, kind=SpanKind.INTERNAL)
        self._recording = span.is_recording()
        # Attributes are set only on a span that is recorded: an unsampled call skips them.
        if self._recording:
            self._rpc = {
                "rpc.system": "grpc",
                "rpc.service": rpc_service,
                "rpc.method": rpc_method,
            }
            span.set_attributes({**self._rpc, "mesh.service": service})
        self.span: Span = span
        self._parent = trace.set_span_in_context(span)

    def attempt(
        self,
        host: str,
        port: int,
        number: int,
        *,
        hedge: bool = False,
        backoff: float = 0.0,
        breaker_state: object = "closed",
    ) -> Span | None:
        """Start the CLIENT span of attempt `number` (1 is the first) to host:port; None
        when the call is not sampled. Hedge, backoff and breaker state are recorded only when
        they say something (a hedge, a wait, a breaker that is not closed): every attribute
        costs on each span and each export."""
        if not self._recording:
            return None
        attributes: dict[str, str | int | float | bool] = {
            **self._rpc,
            "server.address": host,
            "server.port": port,
            "mesh.attempt": number,
            "mesh.retry": number > 1 and not hedge,
        }
        if hedge:
            attributes["mesh.hedge"] = True
        if backoff > 0:
            attributes["mesh.backoff_ms"] = round(backoff * 1000, 3)
        state = str(breaker_state)
        if state != "closed":
            attributes["mesh.breaker_state"] = state
        return self._tracer.start_span(
            self._name, context=self._parent, kind=SpanKind.CLIENT, attributes=attributes
        )

    def carried(self, span: Span | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The attempt's call arguments with the trace added to its metadata: `span`'s
        context, or the call span's when the attempt has no span (an unsampled call)."""
        context = self._parent if span is None else trace.set_span_in_context(span, self._parent)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=context)
        return {**kwargs, "metadata": (*(kwargs["metadata"] or ()), *carrier.items())}

    @staticmethod
    def attempt_ended(span: Span | None, error: BaseException | None) -> None:
        if span is not None:
            _finish(span, error)

    def event(self, name: str, **attributes: Any) -> None:
        """Something the call path decided: a refusal, an empty budget."""
        self.span.add_event(name, attributes)

    def ended(self, error: BaseException | None) -> None:
        _finish(self.span, error)


def _finish(span: Span, error: BaseException | None) -> None:
    if error is None:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    elif isinstance(error, aio.AioRpcError):
        span.set_attribute("rpc.grpc.status_code", error.code().value[0])
        span.set_status(Status(StatusCode.ERROR, f"{error.code().name}: {error.details()}"))
    else:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()
