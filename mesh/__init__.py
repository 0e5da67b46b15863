"""The mesh: what a service needs to serve and to call other services by name.

    server = MeshServer(ServerConfig("catalog", port=0))      # health, reflection, Consul
    stub = OrderServiceStub(mesh.channel("orders"))            # any generated stub

The client-side call path is layered as in ../shared/design.md; today it is
MeshChannel -> round-robin pick -> one sub-channel per endpoint.
"""

from __future__ import annotations

from discovery.consul_resolver import ConsulResolver
from discovery.consul_settings import ConsulSettings
from discovery.resolver import Resolver
from mesh.channel import ChannelConfig, MeshChannel
from mesh.errors import ChannelClosed, MeshError, NoHealthyEndpoints, NotResolved


def channel(
    service: str,
    *,
    resolver: Resolver | None = None,
    consul: ConsulSettings | None = None,
    config: ChannelConfig | None = None,
) -> MeshChannel:
    """A MeshChannel to `service`, discovered through Consul unless `resolver` is given.

    Consul is the agent `consul` names, else the one CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN
    name. The channel owns the resolver it creates and closes it with itself; a resolver
    passed in is shared (several channels may use one) and left open.
    """
    if resolver is not None:
        if consul is not None:
            raise ValueError("give either a resolver or Consul settings, not both")
        return MeshChannel(service, resolver, config=config)
    return MeshChannel(service, ConsulResolver(consul), config=config, owns_resolver=True)


__all__ = [
    "ChannelClosed",
    "ChannelConfig",
    "MeshChannel",
    "MeshError",
    "NoHealthyEndpoints",
    "NotResolved",
    "channel",
]
