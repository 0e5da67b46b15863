"""Errors the mesh raises, each mapped to one gRPC status code.

    MeshError                 base; .code is the grpc.StatusCode a caller sees
     ├── NoHealthyEndpoints   UNAVAILABLE        discovery resolved the service to no endpoint
     ├── NotResolved          UNAVAILABLE        discovery gave no answer before the deadline
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

    def to_rpc_error(self) -> aio.AioRpcError:
        """The AioRpcError a grpc.aio caller expects, with this error's code and message."""
        return aio.AioRpcError(self.code, aio.Metadata(), aio.Metadata(), self.message, None)


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
