"""Service discovery: registering instances in Consul and watching healthy endpoints.

A Resolver turns a service name into a stream of endpoint sets (Consul blocking queries,
or a static list); the mesh channel consumes that stream and never talks to Consul itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.discovery.consul_settings import ConsulSettings
from mesh.discovery.consul_watch import ConsulWatch, next_index, parse_health_entries
from mesh.discovery.endpoint import Endpoint
from mesh.discovery.resolver import EndpointSet, Resolver, StaticResolver

if TYPE_CHECKING:
    from mesh.discovery.consul_registration import ConsulRegistration, ServiceInstance
    from mesh.discovery.consul_resolver import ConsulResolver

_LAZY = {
    "ConsulRegistration": "mesh.discovery.consul_registration",
    "ServiceInstance": "mesh.discovery.consul_registration",
    "ConsulResolver": "mesh.discovery.consul_resolver",
}
"""What needs py-consul, imported on first use (PEP 562): see ConsulSettings.client."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh.discovery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ConsulRegistration",
    "ConsulResolver",
    "ConsulSettings",
    "ConsulWatch",
    "Endpoint",
    "EndpointSet",
    "Resolver",
    "ServiceInstance",
    "StaticResolver",
    "next_index",
    "parse_health_entries",
]
