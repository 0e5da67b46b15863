"""The discovery contract: a stream of endpoint-set changes for one service name.

The balancer consumes this stream and never talks to Consul itself, so Consul, a fixed list
and a test's scripted sets are interchangeable. Each yielded value is the complete set of
healthy endpoints (not a diff); the first value says "resolved", even when it is empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol, runtime_checkable

from mesh.discovery.endpoint import Endpoint

EndpointSet = frozenset[Endpoint]


@runtime_checkable
class Resolver(Protocol):
    """Anything that can watch the healthy endpoints of a service by name."""

    def watch(self, service: str) -> AsyncIterator[EndpointSet]:
        """Yield the full set of endpoints whenever it changes, the first time at once."""
        ...

    async def close(self) -> None:
        """Release connections; watches end."""
        ...


class StaticResolver:
    """A fixed (but replaceable) list of addresses per service: for tests and for running
    without Consul. `set()` pushes a new set to every live watch, which is how tests script
    endpoint changes."""

    def __init__(self, services: Mapping[str, Iterable[str | Endpoint]] | None = None) -> None:
        self._sets: dict[str, EndpointSet] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        for name, addresses in (services or {}).items():
            self._sets[name] = _to_set(addresses)

    def endpoints(self, service: str) -> EndpointSet:
        """The current set for `service` (empty when unknown)."""
        return self._sets.get(service, frozenset())

    async def set(self, service: str, addresses: Iterable[str | Endpoint]) -> None:
        """Replace the set for `service` and wake its watches."""
        self._sets[service] = _to_set(addresses)
        condition = self._changed.get(service)
        if condition is not None:
            async with condition:
                condition.notify_all()

    async def watch(self, service: str) -> AsyncIterator[EndpointSet]:
        condition = self._changed.setdefault(service, asyncio.Condition())
        current = self.endpoints(service)
        yield current
        while True:
            async with condition:
                while self.endpoints(service) == current:
                    await condition.wait()
                current = self.endpoints(service)
            yield current

    async def close(self) -> None:
        return None


def _to_set(addresses: Iterable[str | Endpoint]) -> EndpointSet:
    return frozenset(a if isinstance(a, Endpoint) else Endpoint.parse(a) for a in addresses)
