"""Tracing: OpenTelemetry set up from its standard environment variables, and the mesh's spans.

`tracing_from_env()` reads what every OpenTelemetry SDK reads, so the same process exports to
a local receiver, an OpenTelemetry Collector or Jaeger (OTLP is native there since 1.35) with
only the environment changed:

- `OTEL_SDK_DISABLED=true`, or no `OTEL_EXPORTER_OTLP_ENDPOINT`: no tracing at all (None), and
  the call path skips every tracing branch: near-zero cost when nothing would be exported;
- `OTEL_SERVICE_NAME` (default: the Consul service name), `OTEL_RESOURCE_ATTRIBUTES`;
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, read by the SDK (its default,
  parentbased_always_on, keeps or drops a trace whole);
- spans leave through a BatchSpanProcessor to the OTLP/gRPC exporter.

The provider is passed explicitly to the server interceptor (opentelemetry-instrumentation-
grpc) and to the mesh's own call and attempt spans, the attempt span being the gRPC client
span (mesh/telemetry/call_spans.py says why); nothing depends on the order of monkeypatching.
Health checks and reflection produce no spans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler

from mesh.core.plumbing import PLUMBING_SERVICES


@dataclass(frozen=True)
class Tracing:
    """A configured tracer provider and what the mesh builds on it."""

    provider: TracerProvider
    tracer: trace.Tracer

    def server_interceptor(self) -> Any:
        """Server spans for every call but health checks and reflection."""
        return aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=_traced()
        )

    def client_interceptors(self) -> Sequence[Any]:
        """Client spans (and traceparent propagation) for a plain grpc.aio channel: for
        calls that do not go through a MeshChannel, whose attempt spans are the client
        spans (mesh/telemetry/call_spans.py)."""
        interceptors = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=_traced()
        )
        return list(interceptors)

    def shutdown(self) -> None:
        """Flush what is batched and stop exporting."""
        self.provider.shutdown()


def tracing_from_env(
    service_name: str,
    *,
    instance_id: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Tracing | None:
    """Tracing as OpenTelemetry's environment variables ask; None when it is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or ""
    ).strip()
    if not endpoint:
        return None
    attributes: dict[str, str] = {"service.name": env.get("OTEL_SERVICE_NAME") or service_name}
    if instance_id:
        attributes["service.instance.id"] = instance_id
    return tracing_to(endpoint, Resource.create(attributes))


def tracing_to(endpoint: str, resource: Resource, sampler: Sampler | None = None) -> Tracing:
    """Tracing that exports to the OTLP/gRPC `endpoint` ("http://host:port" is plaintext);
    the sampler is the one given, else the one OTEL_TRACES_SAMPLER(_ARG) name."""
    insecure = endpoint.startswith("http://") or "://" not in endpoint
    target = endpoint.split("://", 1)[-1]
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=insecure))
    )
    return Tracing(provider, provider.get_tracer("foodmesh.mesh"))


def _traced() -> Any:
    return negate(any_of(*(service_prefix(prefix) for prefix in PLUMBING_SERVICES)))
