"""The gateway's parts put together on one MeshServer.

    gateway = Gateway(channel_for, verifier=verifier, public=policy.auth.public, rate_limits=limits)
    server = MeshServer(config, interceptors=gateway.interceptors)
    gateway.install(server)                  # merged reflection, and the router for the rest
    watch, close = CatalogWatch.consul(settings)
    await gateway.follow(aiter(watch))       # while the server runs

The route table (routes.py) comes from Consul; each new table goes to the router at once and
to the descriptors (descriptors.py), which fetch what it needs from the services' reflection
and feed merged reflection (reflection.py) and the router's call shapes. One mesh channel per
Consul service is made on first use and kept.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from grpc import aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mesh.server import MeshServer
from meshkit.gateway.auth import AuthInterceptor, MethodPatterns
from meshkit.gateway.descriptors import MeshDescriptors
from meshkit.gateway.observe import AccessLogInterceptor, GatewayMetrics
from meshkit.gateway.ratelimit import GcraLimiter, Limiter, RateLimitInterceptor, RateLimits
from meshkit.gateway.reflection import SERVICE_NAME as REFLECTION
from meshkit.gateway.reflection import MergedReflection
from meshkit.gateway.router import Router
from meshkit.gateway.routes import RouteTable
from meshkit.gateway.tokens import TokenVerifier

log = logging.getLogger(__name__)
NO_PATTERNS = MethodPatterns()


class Gateway:
    """Router, descriptors, merged reflection and authentication, following the mesh."""

    def __init__(
        self,
        channel_for: Callable[[str], aio.Channel],
        *,
        verifier: TokenVerifier | None = None,
        public: MethodPatterns = NO_PATTERNS,
        internal: MethodPatterns = NO_PATTERNS,
        traces: bool = False,
        rate_limits: RateLimits | None = None,
        limiter: Limiter | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        """`channel_for(name)` makes the mesh channel to Consul service `name`; `verifier`
        None serves every method without a token; `rate_limits` None limits nothing (the
        `limiter` holds the state, local by default); `metrics` counts auth outcomes, rate-limit
        decisions and routes; `traces` says whether the gateway's own spans carry the trace
        on (then the client's trace headers are not forwarded)."""
        self._make_channel = channel_for
        self._channels: dict[str, aio.Channel] = {}
        self.descriptors = MeshDescriptors(
            self.channel, own=(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        )
        self.router = Router(self.channel, self.descriptors.shape_of, strip_trace_context=traces)
        self.reflection = MergedReflection(
            self.descriptors, lambda: self.router.table, (health.SERVICE_NAME, REFLECTION)
        )
        self.interceptors: list[object] = [AccessLogInterceptor()]
        self.metrics = metrics
        if verifier is not None:
            self.interceptors.append(
                AuthInterceptor(
                    verifier,
                    public,
                    internal=internal,
                    applies=self._applies,
                    on_outcome=metrics.auth_outcome if metrics is not None else None,
                )
            )
        if rate_limits is not None:  # inside auth: it needs the verified consumer
            self.interceptors.append(
                RateLimitInterceptor(
                    rate_limits,
                    limiter if limiter is not None else GcraLimiter(),
                    applies=self._applies,
                    on_decision=metrics.rate_decision if metrics is not None else None,
                )
            )

    def channel(self, consul_service: str) -> aio.Channel:
        """The mesh channel to `consul_service`, made on first use."""
        found = self._channels.get(consul_service)
        if found is None:
            found = self._channels[consul_service] = self._make_channel(consul_service)
        return found

    def _applies(self, method: str) -> bool:
        """Authentication applies to the gateway's own services and to routed ones."""
        service = method.lstrip("/").partition("/")[0]
        return service in (health.SERVICE_NAME, REFLECTION) or self.router.knows(method)

    def install(self, server: MeshServer) -> None:
        """Serve merged reflection and route every other method on `server`."""
        server.serve_reflection(self.reflection)
        server.add_generic_handler(self.router)

    async def follow(self, tables: AsyncIterator[RouteTable]) -> None:
        """Route by each table of `tables` as it comes (until it ends)."""

        async def routed() -> AsyncIterator[RouteTable]:
            async for table in tables:
                before = self.router.table
                self.router.table = table
                if self.metrics is not None:
                    self.metrics.routes.set(len(table.routes))
                added = sorted(set(table.routes) - set(before.routes))
                removed = sorted(set(before.routes) - set(table.routes))
                if added or removed:
                    log.info(
                        "routes: %d service(s)%s%s",
                        len(table.routes),
                        f", added {', '.join(added)}" if added else "",
                        f", removed {', '.join(removed)}" if removed else "",
                    )
                yield table

        await self.descriptors.follow(routed())
