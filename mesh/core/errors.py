"""Errors the mesh raises, each mapped to one gRPC status code.

    MeshError                 base; .code is the grpc.StatusCode a caller sees
     ├── NoHealthyEndpoints   UNAVAILABLE        discovery resolved the service to no endpoint
     ├── NotResolved          UNAVAILABLE        discovery gave no answer before the deadline
     ├── CircuitOpen          UNAVAILABLE        the service's circuit breaker is open
     ├── BulkheadFull         RESOURCE_EXHAUSTED too many calls to the service in flight
     ├── NoTimeLeft           DEADLINE_EXCEEDED  the call's deadline passed before an attempt
     └── ChannelClosed        CANCELLED          the MeshChannel was closed

Every message names the service (and the endpoint where one is involved), so that an error
seen three hops away still says where it came from. Callers on a MeshChannel never see these
classes directly: the channel turns them into grpc.aio.AioRpcError with the same code and
message, exactly what a plain grpc.aio channel would raise.
"""

from __future__ import annotations

import grpc
from grpc import aio


class MeshError(Exception):
    """Base of the mesh's errors; `code` is what the caller's RPC fails with."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, service: str, message: str) -> None:
        super().__init__(message)
        self.service = service
        self.message = message

    def to_rpc_error(self) -> RefusedByMesh:
        """The AioRpcError a grpc.aio caller expects, with this error's code and message."""
        return RefusedByMesh(self.code, self.message)


class RefusedByMesh(aio.AioRpcError):
    """An AioRpcError for a call the mesh failed before sending anything: callers see a
    plain AioRpcError; the mesh knows not to count it against any endpoint or the breaker."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, aio.Metadata(), aio.Metadata(), message, None)


class NoHealthyEndpoints(MeshError):
    """Discovery knows the service but reports no healthy instance."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, service: str) -> None:
        super().__init__(service, f"no healthy endpoint for service {service!r}")


class NotResolved(MeshError):
    """Discovery has not answered for the service before the call's deadline."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, service: str, waited: float) -> None:
        super().__init__(
            service, f"service {service!r} was not resolved by discovery within {waited:.3g}s"
        )


class ChannelClosed(MeshError):
    """A call was made on a MeshChannel after close()."""

    code = grpc.StatusCode.CANCELLED

    def __init__(self, service: str) -> None:
        super().__init__(service, f"the mesh channel to service {service!r} is closed")


class CircuitOpen(MeshError):
    """The service's breaker is open: calls fail at once instead of piling up."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, service: str) -> None:
        super().__init__(
            service, f"circuit for service {service!r} is open: too many recent calls failed"
        )


class BulkheadFull(MeshError):
    """The service's concurrency limit is reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, service: str, limit: int) -> None:
        super().__init__(
            service, f"too many calls in flight to service {service!r} (limit {limit})"
        )


class NoTimeLeft(MeshError):
    """The deadline passed (or the inbound call's did) before an attempt could start."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, service: str, method: str) -> None:
        super().__init__(service, f"deadline exceeded before calling {method} on {service!r}")
