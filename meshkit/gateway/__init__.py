"""The API gateway's parts: an edge for clients outside the mesh, that learns its routes and
the services' descriptors from the mesh at run time. Each module is one concern:

    routes.py       the route table (gRPC service -> Consul service), from Consul's catalog
    router.py       forwards any method as raw bytes on the mesh channel of its service
    descriptors.py  every service's descriptors, fetched from its own reflection
    reflection.py   merged server reflection over those descriptors
    tokens.py       JWT verification against an issuer's JWK Set, keys cached
    auth.py         the server interceptor that requires and verifies bearer tokens
    policy.py       the gateway's policy file
    gateway.py      the parts put together on one MeshServer
"""

from meshkit.gateway.auth import AuthInterceptor, MethodPatterns
from meshkit.gateway.descriptors import MeshDescriptors
from meshkit.gateway.gateway import Gateway
from meshkit.gateway.policy import AuthPolicy, GatewayPolicy, load_gateway_policy
from meshkit.gateway.reflection import MergedReflection
from meshkit.gateway.router import Router
from meshkit.gateway.routes import CatalogWatch, Route, RouteTable
from meshkit.gateway.tokens import InvalidToken, KeySet, TokenRules, TokenVerifier

__all__ = [
    "AuthInterceptor",
    "AuthPolicy",
    "CatalogWatch",
    "Gateway",
    "GatewayPolicy",
    "InvalidToken",
    "KeySet",
    "MergedReflection",
    "MeshDescriptors",
    "MethodPatterns",
    "Route",
    "RouteTable",
    "Router",
    "TokenRules",
    "TokenVerifier",
    "load_gateway_policy",
]
