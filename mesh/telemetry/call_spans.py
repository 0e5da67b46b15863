"""The mesh's own spans: one per logical call on a MeshChannel, one child per attempt.

gRPC's client span (from opentelemetry-instrumentation-grpc, on each sub-channel) shows one
HTTP/2 call; it cannot show that three of them were one call, which endpoint each went to,
why a second one was sent, or that the breaker refused the call. These spans do: the call span
carries OpenTelemetry's RPC attributes (`rpc.system`, `rpc.service`, `rpc.method`,
`rpc.grpc.status_code`) and events for refusals (open circuit, empty retry budget); each
attempt span carries the endpoint (`server.address`, `server.port`), its number, whether it is
a retry or a hedge, the backoff waited before it, and the breaker's state, and is the parent
of the gRPC client span of that attempt, so `traceparent` carries the attempt to the server.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode


class CallSpans:
    """The span of one call and the spans of its attempts."""

    __slots__ = ("_parent", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, service: str, full_method: str) -> None:
        rpc_service, _, rpc_method = full_method.lstrip("/").partition("/")
        self._tracer = tracer
        # Attributes are set only on a span that is recorded: an unsampled call skips them.
        span = tracer.start_span(f"{rpc_service}/{rpc_method}", kind=SpanKind.INTERNAL)
        if span.is_recording():
            span.set_attributes(
                {
                    "rpc.system": "grpc",
                    "rpc.service": rpc_service,
                    "rpc.method": rpc_method,
                    "mesh.service": service,
                }
            )
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
    ) -> Span:
        """Start the span of attempt `number` (1 is the first) to host:port. Hedge, backoff
        and breaker state are recorded only when they say something (a hedge, a wait, a
        breaker that is not closed): every attribute costs on each span and each export."""
        span = self._tracer.start_span(
            f"attempt {number}", context=self._parent, kind=SpanKind.INTERNAL
        )
        if span.is_recording():
            attributes: dict[str, str | int | float | bool] = {
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
            span.set_attributes(attributes)
        return span

    @staticmethod
    def current(span: Span) -> _Current:
        """Make `span` the current one, so the gRPC call started inside is its child."""
        return _Current(span)

    @staticmethod
    def attempt_ended(span: Span, error: BaseException | None) -> None:
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


class _Current:
    """`with CallSpans.current(span):` without a generator-based context manager's cost."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)
