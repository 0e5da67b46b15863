"""Test helpers for users' own tests, and the ones the project's tests use.

    from mesh.testing import ChannelFor, FakeClock, InProcessServer, MockChannel, StaticResolver

- FakeClock: a clock that moves only when told to, for anything that takes a `clock`.
- StaticResolver: fixed (and scriptable) endpoint sets instead of Consul.
- InProcessServer: a real grpc.aio server in the test's process, on a free loopback port,
  serving generated servicers or generic handlers, with health and optional reflection.
- ChannelFor: in-process servers of given services and a MeshChannel to them (grpclib's
  `testing.ChannelFor`): the whole client call path over real HTTP/2, no Consul.
- MockChannel: a grpc.aio.Channel that answers given methods with no server at all (httpx's
  `MockTransport`), as a stub's channel or as a MeshChannel's sub-channels; `rpc_error`
  builds the AioRpcError a call ends with.
"""

from mesh.discovery.resolver import StaticResolver
from mesh.testing.clock import FakeClock
from mesh.testing.mock_channel import MockChannel, MockContext, RecordedCall, rpc_error
from mesh.testing.servers import ChannelFor, InProcessServer
from mesh.testing.services import Service

__all__ = [
    "ChannelFor",
    "FakeClock",
    "InProcessServer",
    "MockChannel",
    "MockContext",
    "RecordedCall",
    "Service",
    "StaticResolver",
    "rpc_error",
]
