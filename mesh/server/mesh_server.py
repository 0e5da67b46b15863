"""MeshServer: one object that serves gRPC servicers the way every mesh service must.

It adds grpc.health.v1 (async) and server reflection, refuses calls whose deadline has
passed and runs servicers with the inbound deadline in context, so that their outbound calls
inherit it (mesh/server/deadline.py), optionally injects faults (mesh/server/faults.py),
registers the instance in Consul with a GRPC check against that health service
(mesh/discovery/), and shuts down gracefully on SIGTERM or SIGINT in the order that loses no call:

1. health goes NOT_SERVING (Consul's check, and any client watching health, sees it);
2. the instance is deregistered, so discovery watches drop it within moments;
3. it keeps serving for `drain_delay` while clients' watches catch up (as Envoy's drain time
   or a Kubernetes preStop delay), then stops accepting calls and lets in-flight calls finish
   within `grace_period`;
4. shutdown callbacks run (close outbound channels, databases), and run() returns 0.

A second signal skips the drain delay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from mesh import layers
from mesh.core import keepalive
from mesh.discovery.consul_registration import ConsulRegistration, ServiceInstance
from mesh.discovery.consul_settings import ConsulSettings
from mesh.resilience.faults import FaultPolicy
from mesh.server.deadline import DeadlineInterceptor
from mesh.server.faults import FaultInterceptor
from mesh.server.metrics import MetricsServerInterceptor
from mesh.server.reflection import enable_reflection
from mesh.telemetry.metrics import MeshMetrics

if TYPE_CHECKING:
    from mesh.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

AddServicer = Callable[[Any, aio.Server], None]
ShutdownCallback = Callable[[], Awaitable[None]]
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How one service instance serves and registers itself."""

    service_name: str
    host: str = "127.0.0.1"
    port: int = 0
    """0 binds any free port; the bound port is what gets registered."""
    advertise_host: str | None = None
    """Address registered in Consul; defaults to `host`, or this machine's address for a
    wildcard host."""
    version: str = "0.0.0"
    tags: tuple[str, ...] = ()
    register: bool = True
    """False serves without Consul (tests, or a plain address)."""
    check_interval: float = 2.0
    drain_delay: float = 1.0
    grace_period: float = 10.0
    fault: FaultPolicy = field(default_factory=FaultPolicy)
    """Faults this server injects into every call it serves (off by default): for testing
    how callers cope with a slow or failing instance."""

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("service_name must not be empty")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.drain_delay < 0 or self.grace_period < 0:
            raise ValueError("drain_delay and grace_period must be >= 0")


class MeshServer:
    """A grpc.aio server with health, reflection, Consul registration and graceful stop."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        consul: ConsulSettings | None = None,
        tracing: Tracing | None = None,
        metrics: MeshMetrics | None = None,
        metrics_port: int | None = None,
        instance_id: str | None = None,
        interceptors: Sequence[Any] = (),
    ) -> None:
        """`interceptors` run inside the mesh's own (SERVER_LAYERS), in the order given:
        a gateway's authentication and rate limiting, for example."""
        self.config = config
        self._consul = consul
        self.instance_id = instance_id or new_instance_id(config.service_name)
        self._metrics_port = metrics_port
        self._server = aio.server(
            options=keepalive.server_options(),
            interceptors=[*server_interceptors(config, tracing, metrics), *interceptors],
        )
        # grpc-stubs predate grpcio-health-checking's asyncio servicer.
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._service_names: list[str] = []
        self._reflection: Any = None
        self._generic_handlers: list[grpc.GenericRpcHandler[Any, Any]] = []
        self._on_shutdown: list[ShutdownCallback] = []
        self._on_started: list[ShutdownCallback] = []
        self._registration: ConsulRegistration | None = None
        self._stop_requested = asyncio.Event()
        self._skip_drain = asyncio.Event()
        self.port = 0

    def add_service(
        self, descriptor: ServiceDescriptor, add_to_server: AddServicer, servicer: Any
    ) -> None:
        """Serve `servicer` for the service `descriptor` describes (for health, reflection
        and the Consul meta), e.g. `catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"]`
        with `catalog_pb2_grpc.add_CatalogServiceServicer_to_server`."""
        add_to_server(servicer, self._server)
        self._service_names.append(descriptor.full_name)

    def serve_reflection(self, servicer: Any) -> None:
        """Serve `servicer` as grpc.reflection.v1alpha instead of the reflection of the added
        services (a gateway's merged reflection of the whole mesh)."""
        self._reflection = servicer

    def add_generic_handler(self, handler: grpc.GenericRpcHandler[Any, Any]) -> None:
        """Let `handler` answer the methods no added service serves (a gateway's router);
        health and reflection stay the server's own. Not listed in the Consul meta."""
        self._generic_handlers.append(handler)

    def on_started(self, callback: ShutdownCallback) -> None:
        """Run `callback` once the server serves, before it registers (a gateway's HTTP
        port, which calls this server's port)."""
        self._on_started.append(callback)

    def on_shutdown(self, callback: ShutdownCallback) -> None:
        """Run `callback` after the server has stopped (in the order added)."""
        self._on_shutdown.append(callback)

    @property
    def address(self) -> str:
        """Where clients reach this instance (`host:port`)."""
        host = self._advertised_host()
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _advertised_host(self) -> str:
        if self.config.advertise_host:
            return self.config.advertise_host
        if self.config.host in _WILDCARDS:
            return _primary_address()
        return self.config.host

    async def start(self) -> int:
        """Bind, start serving, set health SERVING and begin registration; the bound port."""
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if self._reflection is None:
            enable_reflection((*self._service_names, health.SERVICE_NAME), self._server)
        else:
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                self._reflection, self._server
            )
        self._server.add_generic_rpc_handlers(tuple(self._generic_handlers))
        host = self.config.host
        bind = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        self.port = self._server.add_insecure_port(bind)
        await self._server.start()
        for name in ("", *self._service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "%s serving %s on %s",
            self.config.service_name,
            ", ".join(self._service_names) or "no services",
            self.address,
        )
        for callback in self._on_started:
            await callback()
        if self.config.register:
            self._registration = ConsulRegistration(self._instance(), self._consul)
            await self._registration.start()
        return self.port

    def _instance(self) -> ServiceInstance:
        cfg = self.config
        return ServiceInstance(
            name=cfg.service_name,
            instance_id=self.instance_id,
            host=self._advertised_host(),
            port=self.port,
            tags=("grpc", *cfg.tags),
            meta={
                "version": cfg.version,
                "grpc_services": ",".join(self._service_names),
                "pid": str(os.getpid()),
                **({"metrics_port": str(self._metrics_port)} if self._metrics_port else {}),
            },
            check_interval=cfg.check_interval,
        )

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does); a second request skips the drain."""
        if self._stop_requested.is_set():
            self._skip_drain.set()
        self._stop_requested.set()

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, deregister, drain, stop, shutdown callbacks."""
        self._stop_requested.set()
        await self._health.enter_graceful_shutdown()
        registration, self._registration = self._registration, None
        if registration is not None:
            deregistered = await registration.deregister()
            await registration.close()
            if deregistered and self.config.drain_delay > 0:
                log.info(
                    "draining for %.1fs while clients drop %s",
                    self.config.drain_delay,
                    self.instance_id,
                )
                try:
                    await asyncio.wait_for(self._skip_drain.wait(), self.config.drain_delay)
                except TimeoutError:
                    pass
        await self._server.stop(self.config.grace_period)
        for callback in self._on_shutdown:
            try:
                await callback()
            except Exception:
                log.exception("shutdown callback %r failed", callback)
        log.info("%s stopped", self.instance_id or self.config.service_name)

    async def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, stop gracefully; the exit code (0)."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop_requested.wait()
            log.info("stopping %s", self.instance_id)
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0


def server_interceptors(
    config: ServerConfig, tracing: Tracing | None = None, metrics: MeshMetrics | None = None
) -> list[Any]:
    """The interceptors of a server so configured, in the order of mesh/layers.py's
    SERVER_LAYERS (outermost first), less the layers that are off."""
    if config.fault.active:
        log.warning("%s injects faults into every call: %s", config.service_name, config.fault)
    available: dict[str, Any] = {
        layers.METRICS: (
            MetricsServerInterceptor(metrics, config.service_name) if metrics is not None else None
        ),
        layers.TRACING: tracing.server_interceptor() if tracing is not None else None,
        layers.DEADLINE: DeadlineInterceptor(),
        layers.FAULTS: FaultInterceptor(config.fault) if config.fault.active else None,
    }
    return [
        interceptor
        for layer in layers.SERVER_LAYERS
        if (interceptor := available[layer.name]) is not None
    ]


def new_instance_id(service: str) -> str:
    """A unique id for one instance of `service` (what Consul, logs and traces call it)."""
    return f"{service}-{uuid.uuid4().hex[:12]}"


def _primary_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed, only used to pick a source
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
