"""Service discovery: registering instances in Consul and watching healthy endpoints.

A Resolver turns a service name into a stream of endpoint sets (Consul blocking queries,
or a static list); the mesh channel consumes that stream and never talks to Consul itself.
"""

from discovery.backoff import ExponentialBackoff
from discovery.consul_registration import ConsulRegistration, ServiceInstance
from discovery.consul_resolver import ConsulResolver
from discovery.consul_settings import ConsulSettings
from discovery.consul_watch import ConsulWatch, next_index, parse_health_entries
from discovery.endpoint import Endpoint
from discovery.resolver import EndpointSet, Resolver, StaticResolver

__all__ = [
    "ConsulRegistration",
    "ConsulResolver",
    "ConsulSettings",
    "ConsulWatch",
    "Endpoint",
    "EndpointSet",
    "ExponentialBackoff",
    "Resolver",
    "ServiceInstance",
    "StaticResolver",
    "next_index",
    "parse_health_entries",
]
