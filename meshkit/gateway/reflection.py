"""Merged server reflection: the gateway answers for every service in the mesh.

`grpcurl <gateway> list` lists the services of the route table (and the gateway's own health
and reflection); `describe` and calls without .proto files resolve symbols in the pool of
meshkit/gateway/descriptors.py, which holds every routed service's files. The answers are
grpcio-reflection's own (the file with its imports); what differs is where they come from:
the current route table and the current pool, read on every request, since both change while
the gateway runs. Method symbols resolve too (mesh/server/reflection.py's MethodAwarePool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from grpc_reflection.v1alpha import _async, reflection_pb2

from mesh.server.reflection import MethodAwarePool
from meshkit.gateway.descriptors import MeshDescriptors
from meshkit.gateway.routes import RouteTable


class MergedReflection(_async.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's servicer over the mesh's current services and descriptors."""

    def __init__(
        self,
        descriptors: MeshDescriptors,
        table: Callable[[], RouteTable],
        own_services: Iterable[str],
    ) -> None:
        super().__init__((), pool=None)
        self._descriptors = descriptors
        self._table = table
        self._own = tuple(own_services)

    # grpcio-reflection reads these two attributes; here they follow the mesh.
    @property
    def _pool(self) -> Any:
        return MethodAwarePool(self._descriptors.pool)

    @_pool.setter
    def _pool(self, _: Any) -> None:
        pass

    @property
    def _service_names(self) -> tuple[str, ...]:
        return tuple(sorted({*self._table().routes, *getattr(self, "_own", ())}))

    @_service_names.setter
    def _service_names(self, _: Any) -> None:
        pass


SERVICE_NAME = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
