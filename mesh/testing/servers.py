"""Real grpc.aio servers inside the test's own process, and mesh channels to them.

    async with ChannelFor((add_CatalogServiceServicer_to_server, FakeCatalog())) as channel:
        item = await CatalogServiceStub(channel).GetItem(request)

`ChannelFor` (grpclib's `testing.ChannelFor` is the model) starts one or more in-process
servers of the given services on free loopback ports and yields a MeshChannel that finds
them through a StaticResolver, so the test runs the whole client call path (deadlines,
retries, the breaker, balancing) and real HTTP/2, without Consul or a child process.
`InProcessServer` is the server alone, for tests that make their own channel or want one
server per endpoint with its own behaviour. Both serve grpc.health.v1 (SERVING) and, when
asked, server reflection, as a MeshServer would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.client.channel import MeshChannel
from mesh.discovery.resolver import StaticResolver
from mesh.policy import MeshPolicy, ServicePolicy
from mesh.server.reflection import enable_reflection
from mesh.telemetry.metrics import MeshMetrics
from mesh.testing.services import Service, generic_handlers, service_names

if TYPE_CHECKING:
    from mesh.telemetry.tracing import Tracing


class InProcessServer:
    """A grpc.aio server on a free port of 127.0.0.1, serving `services` in this process.

    `reflection`: True serves reflection for every service it serves (and health); a list
    names the services. `interceptors` and `options` go to grpc.aio.server as they are.
    """

    def __init__(
        self,
        *services: Service,
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
        health_service: bool = True,
        reflection: bool | Iterable[str] = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.server = aio.server(interceptors=list(interceptors), options=list(options))
        handlers = generic_handlers(services)
        self.server.add_generic_rpc_handlers(handlers)
        self._health = health.aio.HealthServicer() if health_service else None  # type: ignore[attr-defined]
        names = service_names(handlers)
        if self._health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
            names.append(health.SERVICE_NAME)
        if reflection is True:
            enable_reflection(names, self.server)
        elif reflection:
            enable_reflection(reflection, self.server)
        self.port = self.server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"
        self._started = False
        self._channel: aio.Channel | None = None

    async def start(self) -> str:
        """Start serving (health SERVING); the address, `host:port`."""
        await self.server.start()
        self._started = True
        if self._health is not None:
            await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Stop (and close `channel`); calls in flight get `grace` seconds (None: cancelled
        at once)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)
        if self._started:
            self._started = False
            await self.server.stop(grace)

    @property
    def channel(self) -> aio.Channel:
        """A plain grpc.aio channel to this server, made on first use, closed by `stop()`."""
        if self._channel is None:
            self._channel = aio.insecure_channel(self.address)
        return self._channel

    async def __aenter__(self) -> InProcessServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class ChannelFor:
    """A MeshChannel to `instances` in-process servers of `services`, as a context manager.

    The channel is addressed as `service` (the Consul name it would have) and follows the
    given policy, tracing and metrics; `servers` and `resolver` are there for the test to
    stop an instance or script the endpoint set (`await resolver.set(...)`).
    """

    def __init__(
        self,
        *services: Service,
        service: str = "test",
        instances: int = 1,
        policy: MeshPolicy | ServicePolicy | None = None,
        tracing: Tracing | None = None,
        metrics: MeshMetrics | None = None,
        interceptors: Sequence[Any] = (),
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if not services:
            raise ValueError("ChannelFor needs at least one service to serve")
        self.service = service
        self.servers = [
            InProcessServer(*services, interceptors=interceptors) for _ in range(instances)
        ]
        self.resolver = StaticResolver({service: [s.address for s in self.servers]})
        if isinstance(policy, MeshPolicy):
            policy = policy.for_service(service)
        self._channel = MeshChannel(
            service, self.resolver, policy=policy, tracing=tracing, metrics=metrics
        )

    async def __aenter__(self) -> MeshChannel:
        for server in self.servers:
            await server.start()
        return self._channel

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()
        for server in self.servers:
            await server.stop()
