"""The value that discovery hands to the balancer: one reachable instance of a service.

Identity is the address alone (host and port): an instance that re-registers under a new
Consul id on the same address keeps its sub-channel, and two ids on one address cannot both
get traffic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service: where to connect, and what the registry says about it."""

    host: str
    port: int
    instance_id: str = field(default="", compare=False)
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY, compare=False, hash=False)
    tags: tuple[str, ...] = field(default=(), compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("endpoint host must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"endpoint port must be in 1..65535, got {self.port}")

    @property
    def address(self) -> str:
        """`host:port`, with IPv6 hosts in brackets, as grpc targets want it."""
        if ":" in self.host and not self.host.startswith("["):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, address: str) -> Endpoint:
        """Build an endpoint from `host:port` or `[v6]:port`; a clear ValueError otherwise."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {address!r} is not of the form host:port")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return self.address
