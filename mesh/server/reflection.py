"""Server reflection that grpcurl can fully use against a Python server.

grpcio-reflection answers `file_containing_symbol` from the descriptor pool, and the pool
does not resolve method symbols (`pkg.Service.Method`), so `grpcurl describe
pkg.Service.Method` fails with "Symbol not found" against stock Python servers while it works
against Go servers (grpc/grpc#34743). The pool below falls back from a method name to the
service that declares it, which is the file reflection must return; everything else is the
default pool's answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from google.protobuf import descriptor, descriptor_pool
from grpc import aio
from grpc_reflection.v1alpha import reflection


class MethodAwarePool:
    """A descriptor pool view that also finds the file of a method symbol."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(service_names: Iterable[str], server: aio.Server) -> None:
    """Serve grpc.reflection.v1alpha for `service_names` (add the reflection service's own)."""
    names = (*service_names, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(
        names, server, pool=cast(descriptor_pool.DescriptorPool, MethodAwarePool())
    )
