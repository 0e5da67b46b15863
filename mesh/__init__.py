"""The mesh: what a service needs to serve and to call other services by name.

    server = MeshServer(ServerConfig("catalog", port=0))      # health, reflection, Consul
    stub = OrderServiceStub(mesh.channel("orders"))            # any generated stub

Where things are:

    client/      the call path of a MeshChannel     server/     MeshServer and its interceptors
    resilience/  each layer's policy and mechanism  core/       values both sides share
    discovery/   Consul registration and watches    telemetry/  traces, metrics, logs
    policy.py    the whole-mesh policy, from TOML   testing/    helpers for users' tests
    layers.py    the layers and their order, written once (`meshctl layers` prints them)

Policies come from one TOML file (mesh/policy.py), with defaults that are good without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesh.client.channel import MeshChannel
from mesh.core.errors import ChannelClosed, MeshError, NoHealthyEndpoints, NotResolved
from mesh.discovery.consul_settings import ConsulSettings
from mesh.discovery.resolver import Resolver
from mesh.policy import MeshPolicy, ServicePolicy, load_policy, load_policy_from_env
from mesh.telemetry.metrics import MeshMetrics

if TYPE_CHECKING:
    from mesh.telemetry.tracing import Tracing


def channel(
    service: str,
    *,
    resolver: Resolver | None = None,
    consul: ConsulSettings | None = None,
    policy: MeshPolicy | ServicePolicy | None = None,
    tracing: Tracing | None = None,
    metrics: MeshMetrics | None = None,
) -> MeshChannel:
    """A MeshChannel to `service`, discovered through Consul unless `resolver` is given.

    Consul is the agent `consul` names, else the one CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN
    name. The channel owns the resolver it creates and closes it with itself; a resolver
    passed in is shared (several channels may use one) and left open. The policy is the one
    given (a whole MeshPolicy or this service's ServicePolicy), else the file that
    FOODMESH_POLICY names, else the defaults. With `tracing` (see
    mesh.telemetry.tracing.tracing_from_env), calls make spans and carry the trace onward;
    with `metrics` (mesh.telemetry.metrics), they are counted.
    """
    if policy is None:
        policy = load_policy_from_env()
    service_policy = policy.for_service(service) if isinstance(policy, MeshPolicy) else policy
    if resolver is not None:
        if consul is not None:
            raise ValueError("give either a resolver or Consul settings, not both")
        return MeshChannel(
            service, resolver, policy=service_policy, tracing=tracing, metrics=metrics
        )
    # Imported here: py-consul and aiohttp load only for channels that use Consul.
    from mesh.discovery.consul_resolver import ConsulResolver

    return MeshChannel(
        service,
        ConsulResolver(consul),
        policy=service_policy,
        owns_resolver=True,
        tracing=tracing,
        metrics=metrics,
    )


__all__ = [
    "ChannelClosed",
    "MeshChannel",
    "MeshError",
    "MeshPolicy",
    "NoHealthyEndpoints",
    "NotResolved",
    "ServicePolicy",
    "channel",
    "load_policy",
]
