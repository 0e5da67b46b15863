"""MeshChannel: a grpc.aio.Channel for a service *name*, so generated stubs work unchanged.

    OrderServiceStub(mesh.channel("orders"))

The channel follows a Resolver's stream of endpoint sets (mesh/discovery/), keeps one
sub-channel per endpoint (mesh/client/subchannels.py), and hands each call to the layers of
the call path, in the order mesh/layers.py gives (mesh/client/upstream.py, unary_call.py,
stream_call.py). What each of those does is set by the service's policy (mesh/policy.py),
good by default. Before discovery first answers, a call waits for it
(within its deadline); once discovery says there is no healthy endpoint, a call fails at once
with UNAVAILABLE naming the service.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from mesh.client.stream_call import StreamingCall
from mesh.client.subchannels import (
    CallableKey,
    ChannelFactory,
    MultiCallables,
    SubChannelPool,
    insecure_subchannel,
)
from mesh.client.unary_call import UnaryUnaryCall
from mesh.client.upstream import Upstream
from mesh.core.deadline import outbound_timeout
from mesh.core.errors import ChannelClosed
from mesh.discovery.resolver import Resolver
from mesh.policy import ServicePolicy
from mesh.telemetry.metrics import MeshMetrics

if TYPE_CHECKING:
    from mesh.telemetry.tracing import Tracing

log = logging.getLogger(__name__)


class MeshChannel(MultiCallables, aio.Channel):
    """A grpc.aio.Channel that routes each call to a healthy instance of `service`."""

    def __init__(
        self,
        service: str,
        resolver: Resolver,
        *,
        policy: ServicePolicy | None = None,
        close_grace: float = 10.0,
        channel_factory: ChannelFactory = insecure_subchannel,
        owns_resolver: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        tracing: Tracing | None = None,
        metrics: MeshMetrics | None = None,
    ) -> None:
        if not service:
            raise ValueError("service name must not be empty")
        if close_grace < 0:
            raise ValueError(f"close_grace must be >= 0, got {close_grace}")
        self.service = service
        self.policy = policy if policy is not None else ServicePolicy()
        self._resolver = resolver
        self._owns_resolver = owns_resolver
        self._pool = SubChannelPool(service, channel_factory, close_grace=close_grace, clock=clock)
        self._clock = clock
        self.upstream = Upstream(
            service,
            self.policy,
            self._pool,
            clock=clock,
            rng=rng,
            tracer=tracing.tracer if tracing is not None else None,
            metrics=metrics,
        )
        self._follower: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._closed = False

    # -- discovery ----------------------------------------------------------------------

    def _follow_discovery(self) -> None:
        if self._follower is None and not self._closed:
            self._changed = asyncio.Event()
            self._follower = asyncio.get_running_loop().create_task(
                self._follow(), name=f"mesh-discovery-{self.service}"
            )

    async def _follow(self) -> None:
        try:
            async for endpoints in self._resolver.watch(self.service):
                self._pool.update(endpoints)
                if metrics := self.upstream.metrics:
                    metrics.healthy_endpoints(self.service, len(endpoints))
                self._signal_change()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "discovery of %r stopped; keeping %d endpoint(s)",
                self.service,
                len(self._pool.endpoints),
            )

    def _signal_change(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = asyncio.Event()
            changed.set()

    @property
    def endpoints(self) -> frozenset[Any]:
        """The endpoints calls are currently spread over."""
        return self._pool.endpoints

    async def wait_for_endpoints(self, timeout: float | None = None) -> bool:
        """Wait until discovery has answered and at least one endpoint is known."""
        self._follow_discovery()
        deadline = None if timeout is None else self._clock() + timeout
        while not self._pool.endpoints:
            if not await self._wait_change(deadline):
                return False
        return True

    async def _wait_change(self, deadline: float | None) -> bool:
        """Wait for the next endpoint-set change; False when the deadline passes first."""
        changed = self._changed
        if changed is None or self._closed:
            return False
        remaining = None if deadline is None else deadline - self._clock()
        if remaining is not None and remaining <= 0:
            return False
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            return False
        return True

    # -- calls --------------------------------------------------------------------------

    def _invoke(
        self, key: CallableKey, request: Any, timeout: float | None, kwargs: dict[str, Any]
    ) -> Any:
        plan = self.upstream.plan(key.method)
        timeout = outbound_timeout(timeout, plan.timeout)
        refused = None
        if self._follower is None:
            if self._closed:
                refused = ChannelClosed(self.service).to_rpc_error()
            else:
                self._follow_discovery()
        call_type = UnaryUnaryCall if key.shape == "unary_unary" else StreamingCall
        return call_type(
            self.upstream, plan, key, request, timeout, kwargs, self._wait_resolved, refused
        )

    async def _wait_resolved(self, deadline: float) -> bool:
        """Wait until discovery has answered once (False if `deadline` passes first)."""
        while not self._pool.resolved:
            if not await self._wait_change(deadline):
                return False
        return True

    # -- grpc.aio.Channel ---------------------------------------------------------------

    def _multicallable(self, key: CallableKey) -> Any:
        return _SHAPES[key.shape](self, key)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY if any endpoint is ready; TRANSIENT_FAILURE when resolved to none."""
        if self._closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        if try_to_connect:
            self._follow_discovery()
        states = {sub.get_state(try_to_connect) for sub in self._pool.subchannels()}
        for state in (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.IDLE,
        ):
            if state in states:
                return state
        if states or self._pool.resolved:
            return grpc.ChannelConnectivity.TRANSIENT_FAILURE
        return (
            grpc.ChannelConnectivity.CONNECTING if self._follower else grpc.ChannelConnectivity.IDLE
        )

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Return when get_state() differs from `last_observed_state`."""
        while self.get_state() == last_observed_state and not self._closed:
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(sub.channel.wait_for_state_change(sub.get_state()))
                for sub in self._pool.subchannels()
            ]
            if self._changed is not None:
                waiters.append(asyncio.ensure_future(self._changed.wait()))
            if not waiters:
                return
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def channel_ready(self) -> None:
        """Wait until some endpoint of the service is READY."""
        state = self.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                raise ChannelClosed(self.service).to_rpc_error()
            await self.wait_for_state_change(state)
            state = self.get_state(try_to_connect=True)

    async def close(self, grace: float | None = None) -> None:
        """Stop following discovery and close every sub-channel (calls get `grace` seconds)."""
        if self._closed:
            return
        self._closed = True
        self._signal_change()
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        await self._pool.close(grace)
        if self._owns_resolver:
            await self._resolver.close()

    async def __aenter__(self) -> MeshChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close(None)

    def __repr__(self) -> str:
        return f"MeshChannel({self.service!r}, endpoints={len(self._pool.endpoints)})"


class _MethodOnMesh:
    """One method on a MeshChannel; the four shapes below differ only in their signatures."""

    __slots__ = ("_channel", "_key")

    def __init__(self, channel: MeshChannel, key: CallableKey) -> None:
        self._channel = channel
        self._key = key

    def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        kwargs = {
            "metadata": metadata,
            "credentials": credentials,
            "wait_for_ready": wait_for_ready,
            "compression": compression,
        }
        return self._channel._invoke(self._key, request, timeout, kwargs)


class _UnaryUnary(_MethodOnMesh, aio.UnaryUnaryMultiCallable[Any, Any]):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_MethodOnMesh, aio.UnaryStreamMultiCallable[Any, Any]):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_MethodOnMesh, aio.StreamUnaryMultiCallable[Any, Any]):
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _StreamStream(_MethodOnMesh, aio.StreamStreamMultiCallable[Any, Any]):
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


_SHAPES: dict[str, type[_MethodOnMesh]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}
