"""One long-lived grpc.aio sub-channel per endpoint, kept in step with discovery.

An endpoint that appears gets a sub-channel (connected lazily by gRPC); one that disappears
is taken out of the rotation at once, and its sub-channel is closed in the background with a
grace period, so calls already running on it finish instead of being cut. The choice among
them is the Upstream's (mesh/client/upstream.py): a balancer over the endpoints that outlier
ejection has not taken out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
from grpc import aio

from mesh.core import keepalive
from mesh.discovery.endpoint import Endpoint
from mesh.discovery.resolver import EndpointSet
from mesh.resilience.balance.load import EndpointLoad
from mesh.resilience.ejection import EjectionState

log = logging.getLogger(__name__)

ChannelFactory = Callable[[Endpoint], aio.Channel]
Clock = Callable[[], float]


class CallableKey(NamedTuple):
    """What a multi-callable is made of; the key of the ones a sub-channel keeps."""

    shape: str
    """"unary_unary", "unary_stream", "stream_unary" or "stream_stream": grpc.aio.Channel's
    method of that name makes it."""
    method: str
    """The full method name, "/pkg.Service/Method"."""
    request_serializer: Any
    response_deserializer: Any


Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None


class MultiCallables:
    """grpc.aio.Channel's four multi-callable makers as one: a channel that mixes this in
    (before aio.Channel) implements `_multicallable(key)`, and the shape is in the key."""

    def _multicallable(self, key: CallableKey) -> Any:
        raise NotImplementedError

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        key = CallableKey("unary_unary", method, request_serializer, response_deserializer)
        return self._multicallable(key)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        key = CallableKey("unary_stream", method, request_serializer, response_deserializer)
        return self._multicallable(key)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        key = CallableKey("stream_unary", method, request_serializer, response_deserializer)
        return self._multicallable(key)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        key = CallableKey("stream_stream", method, request_serializer, response_deserializer)
        return self._multicallable(key)


def insecure_subchannel(endpoint: Endpoint) -> aio.Channel:
    """The default sub-channel: plaintext, with the mesh's keepalive settings. It has no
    interceptors: tracing happens a layer above, in the attempt spans."""
    return aio.insecure_channel(endpoint.address, options=keepalive.client_options())


class SubChannel:
    """A sub-channel to one endpoint, the multi-callables made on it (made once), and the
    endpoint's state for the balancer (load) and outlier ejection."""

    __slots__ = ("_callables", "attempts", "channel", "ejection", "endpoint", "load")

    def __init__(self, endpoint: Endpoint, channel: aio.Channel, clock: Clock) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self._callables: dict[CallableKey, Any] = {}
        self.load = EndpointLoad(clock)
        self.ejection = EjectionState(endpoint.address)
        self.attempts = 0
        """Attempts sent to this endpoint."""

    def multicallable(self, key: CallableKey) -> Any:
        """The sub-channel's multi-callable for (shape, method, serializer, deserializer)."""
        found = self._callables.get(key)
        if found is None:
            make = getattr(self.channel, key.shape)
            found = make(
                key.method,
                request_serializer=key.request_serializer,
                response_deserializer=key.response_deserializer,
                _registered_method=True,
            )
            self._callables[key] = found
        return found

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect)

    def __repr__(self) -> str:
        return f"SubChannel({self.endpoint.address})"


class SubChannelPool:
    """The live sub-channels of one service, and round-robin picking among them."""

    def __init__(
        self,
        service: str,
        factory: ChannelFactory,
        *,
        close_grace: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.service = service
        self._clock = clock
        self._factory = factory
        self._close_grace = close_grace
        self._subchannels: dict[Endpoint, SubChannel] = {}
        self._ring: tuple[SubChannel, ...] = ()
        self._retiring: set[asyncio.Task[None]] = set()
        self.resolved = False
        self.generation = 0

    @property
    def endpoints(self) -> EndpointSet:
        return frozenset(self._subchannels)

    def subchannels(self) -> tuple[SubChannel, ...]:
        return self._ring

    def update(self, endpoints: EndpointSet) -> None:
        """Make the pool match `endpoints`: open the new, retire the gone."""
        self.resolved = True
        self.generation += 1
        current = self._subchannels
        added = [ep for ep in endpoints if ep not in current]
        removed = [ep for ep in current if ep not in endpoints]
        for endpoint in added:
            current[endpoint] = SubChannel(endpoint, self._factory(endpoint), self._clock)
        for endpoint in removed:
            self._retire(current.pop(endpoint))
        self._ring = tuple(sorted(current.values(), key=lambda s: s.endpoint.address))
        if added or removed:
            log.info(
                "%s: %d endpoint(s)%s%s",
                self.service,
                len(self._ring),
                f", added {', '.join(e.address for e in added)}" if added else "",
                f", removed {', '.join(e.address for e in removed)}" if removed else "",
            )

    def _retire(self, sub: SubChannel, grace: float | None = None) -> None:
        grace = self._close_grace if grace is None else grace
        task = asyncio.get_running_loop().create_task(sub.channel.close(grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, grace: float | None = None) -> None:
        """Close every sub-channel (in-flight calls get `grace` seconds) and wait for all."""
        for sub in self._ring:
            self._retire(sub, grace)
        self._subchannels.clear()
        self._ring = ()
        await asyncio.gather(*list(self._retiring), return_exceptions=True)
