"""Where the load goes: a Consul service name through a MeshChannel, or host:port on a bare
grpc.aio channel, and the method found there.

Why both: through the MeshChannel, discovery, balancing, retries and ejection are part of what
is measured, which is what a caller of the service lives with; a bare channel to one instance
measures the server alone, for comparison (the difference is what the mesh adds). A text with
a ':' is an address ("127.0.0.1:50051", "[::1]:50051"), anything else a service name, since
Consul service names cannot hold one.

Everything here runs before any load is sent (`prepare`: connect, find the method, check the
request against it), and every failure is a BadInput that names the service or address (and
the Consul agent asked), the method or the field, so that `meshctl load` exits 2 at once
instead of sending a run's worth of failing calls. Worker processes prepare again from the
same CallSpec, each with its own channel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc import aio

import mesh
from mesh.core import keepalive
from mesh.discovery.consul_settings import ConsulSettings
from mesh.policy import PolicyError
from meshctl.load.errors import BadInput
from meshctl.load.request import (
    MethodInfo,
    RequestTemplate,
    method_from_reflection,
    method_from_stubs,
    parse_method_name,
)

SOURCES = ("reflection", "stubs")
"""Where the method and its messages come from."""


@dataclass(frozen=True, slots=True)
class Target:
    """A service name (with the Consul agent that knows it) or a host:port address."""

    name: str
    consul: ConsulSettings | None = None
    """The agent to ask; None for an address."""

    @classmethod
    def parse(cls, text: str, consul: ConsulSettings) -> Target:
        """The target `text` names: an address when it holds a ':', else a service name."""
        text = text.strip()
        if not text:
            raise BadInput("the target must not be empty: give a service name or host:port")
        if ":" in text:
            host, _, port = text.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise BadInput(f"bad address {text!r}: expected host:port")
            return cls(text)
        return cls(text, consul)

    @property
    def is_address(self) -> bool:
        return self.consul is None


@dataclass(slots=True)
class Connection:
    """An open channel to the target, and the address that answers server reflection."""

    channel: aio.Channel
    reflection_address: str

    async def close(self) -> None:
        await self.channel.close(None)


async def connect(target: Target, timeout: float) -> Connection:
    """A channel to `target` that has reached it: an address connected within `timeout`, a
    service with at least one healthy instance known from Consul within `timeout`."""
    if target.consul is None:
        channel = aio.insecure_channel(target.name, options=keepalive.client_options())
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except TimeoutError:
            await channel.close(None)
            raise BadInput(f"cannot connect to {target.name} within {timeout:g} s") from None
        return Connection(channel, target.name)
    try:
        service = mesh.channel(target.name, consul=target.consul)
    except PolicyError as exc:
        raise BadInput(f"mesh policy: {exc}") from None
    if not await service.wait_for_endpoints(timeout):
        resolved = service.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        await service.close(None)
        agent = target.consul.http_addr
        if resolved:
            raise BadInput(
                f"unknown service {target.name!r}: Consul at {agent} lists no passing instance"
                f" of it (waited {timeout:g} s)"
            )
        raise BadInput(
            f"no answer from Consul at {agent} about service {target.name!r} within "
            f"{timeout:g} s (is the agent running? set CONSUL_HTTP_ADDR or --consul)"
        )
    address = min(endpoint.address for endpoint in service.endpoints)
    return Connection(service, address)


async def resolve_method(
    name: str, source: str, reflection_address: str, timeout: float
) -> MethodInfo:
    """The method `name` from server reflection at `reflection_address`, or from the
    installed foodmesh stubs (`source` "stubs")."""
    if source == "stubs":
        return method_from_stubs(name)
    if source != "reflection":
        raise BadInput(f"unknown method source {source!r} (one of {', '.join(SOURCES)})")
    return await method_from_reflection(reflection_address, name, timeout)


Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class CallSpec:
    """What every worker needs to make the run's calls: picklable, so it crosses processes."""

    target: Target
    method: str
    """As the user wrote it: "pkg.Service/Method" or "pkg.Service.Method"."""
    data: str = "{}"
    """The request template (JSON)."""
    source: str = "reflection"
    metadata: Metadata | None = None
    connect_timeout: float = 10.0
    """Bounds connecting (or finding a healthy instance) and the reflection lookup."""
    reflection_address: str | None = None
    """Where to ask reflection; None: the address connect() found (workers get the parent's,
    so that every worker sees the same descriptors)."""


@dataclass(slots=True)
class Prepared:
    """A connection, the method, and the request template: all checked, ready for load."""

    connection: Connection
    method: MethodInfo
    template: RequestTemplate

    async def close(self) -> None:
        await self.connection.close()


async def prepare(spec: CallSpec, worker: int = 0) -> Prepared:
    """Connect, find the method, parse the template for worker `worker` and render it once;
    BadInput on the first thing that cannot work. With stubs, the method and the body are
    checked before connecting, so that a typo fails at once (and the method name's form
    always is)."""
    parse_method_name(spec.method)
    method = template = None
    if spec.source == "stubs":
        method = await resolve_method(spec.method, spec.source, "", spec.connect_timeout)
        template = _template(spec.data, method, worker)
    connection = await connect(spec.target, spec.connect_timeout)
    try:
        if method is None or template is None:
            address = spec.reflection_address or connection.reflection_address
            method = await resolve_method(spec.method, spec.source, address, spec.connect_timeout)
            template = _template(spec.data, method, worker)
    except BaseException:
        await connection.close()
        raise
    return Prepared(connection, method, template)


def _template(data: str, method: MethodInfo, worker: int) -> RequestTemplate:
    template = RequestTemplate.parse(data, method, worker)
    template.render(0)
    return template
