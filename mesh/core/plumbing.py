"""The mesh's own plumbing: health checks and server reflection.

Tracing, metrics and fault injection leave these services alone, on both sides: health
checks come every few seconds from Consul and would drown the traces and counts people look
for, and an instance whose health check failed by injection would leave discovery, when the
point of a fault is to see callers cope with an instance that stays in it.
"""

from __future__ import annotations

PLUMBING_SERVICES = ("grpc.health.v1", "grpc.reflection")
"""Prefixes of the fully-qualified gRPC service names that are plumbing."""

PLUMBING_METHOD_PREFIXES = tuple(f"/{name}." for name in PLUMBING_SERVICES)
"""The same as prefixes of full method names ("/grpc.health.v1.Health/Check")."""


def is_plumbing(full_method: str) -> bool:
    """Whether `full_method` ("/pkg.Service/Method", the leading slash optional) is plumbing."""
    return f"/{full_method.lstrip('/')}".startswith(PLUMBING_METHOD_PREFIXES)
