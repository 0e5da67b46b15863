"""The gateway's route table: which Consul service serves which gRPC service, from Consul.

Every MeshServer registers its instances with a `grpc_services` meta (the fully-qualified
names of the services it serves) and a `version` meta. The table is built from that alone,
so a new service is routable as soon as it registers and stops being routable when its last
instance deregisters, with no configuration and no restart.

The table follows Consul with one blocking query on `/v1/catalog/services`, whose index
moves whenever any registration changes (a check going critical does not move it: health is
the mesh channel's business, which answers UNAVAILABLE when no instance is healthy). On each
move the instances of every service are read again (`/v1/catalog/service/<name>`, unhealthy
ones included, so that a service whose instances are all sick is still *known*). The loop
keeps Consul's blocking-query rules (mesh/discovery/consul_watch.py's `next_index`) and, while
Consul is unreachable, keeps the last table.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.core.backoff import ExponentialBackoff
from mesh.discovery.consul_settings import ConsulSettings
from mesh.discovery.consul_watch import ServicesFetch, next_index

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """Where calls to one gRPC service go."""

    grpc_service: str
    """The fully-qualified name in the call's path, `foodmesh.catalog.v1.CatalogService`."""
    consul_service: str
    """The Consul service whose instances serve it (a mesh channel's name), `catalog`."""
    versions: frozenset[str]
    """The `version` meta of its registered instances: when it changes, the descriptors the
    gateway keeps for the service are fetched again."""
    instances: int


@dataclass(frozen=True, slots=True)
class RouteTable:
    """An immutable snapshot of the routes; a new one replaces it on every change."""

    routes: Mapping[str, Route]

    def get(self, grpc_service: str) -> Route | None:
        return self.routes.get(grpc_service)

    def consul_services(self) -> frozenset[str]:
        return frozenset(route.consul_service for route in self.routes.values())

    @classmethod
    def from_catalog(cls, instances: Mapping[str, Iterable[Mapping[str, Any]]]) -> RouteTable:
        """The table for `/v1/catalog/service/<name>` answers keyed by Consul service name.

        A gRPC service two Consul services both claim goes to the one with more instances
        (then the first by name), with a warning: a rename in progress, or a mistake.
        """
        claims: dict[str, dict[str, tuple[int, set[str]]]] = {}
        for consul_service, entries in sorted(instances.items()):
            for entry in entries:
                meta = entry.get("ServiceMeta") or {}
                version = str(meta.get("version") or "")
                for name in str(meta.get("grpc_services") or "").split(","):
                    if not (name := name.strip()):
                        continue
                    count, versions = claims.setdefault(name, {}).get(consul_service, (0, set()))
                    versions.add(version)
                    claims[name][consul_service] = (count + 1, versions)
        routes = {}
        for grpc_service, by_consul in claims.items():
            ranked = sorted(by_consul.items(), key=lambda item: (-item[1][0], item[0]))
            consul_service, (count, versions) = ranked[0]
            if len(ranked) > 1:
                log.warning(
                    "%s is served by Consul services %s; routing to %r",
                    grpc_service,
                    ", ".join(repr(name) for name, _ in ranked),
                    consul_service,
                )
            routes[grpc_service] = Route(grpc_service, consul_service, frozenset(versions), count)
        return cls(routes)


EMPTY = RouteTable({})

# service name -> entries of /v1/catalog/service/<name>
InstancesFetch = Callable[[str], Awaitable[list[Mapping[str, Any]]]]


class CatalogWatch:
    """An async iterator over the route tables Consul's catalog implies, one per change.

    `fetch_services` and `fetch_instances` are injectable so that the loop is tested with
    scripted answers; `consul()` builds them on py-consul.
    """

    def __init__(
        self,
        fetch_services: ServicesFetch,
        fetch_instances: InstancesFetch,
        *,
        wait: float = 30.0,
        min_interval: float = 0.1,
        backoff: ExponentialBackoff = ExponentialBackoff(0.25, 10.0),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._fetch_services = fetch_services
        self._fetch_instances = fetch_instances
        self._wait = wait
        self._min_interval = min_interval
        self._backoff = backoff
        self._sleep = sleep
        self._rng = rng

    async def __aiter__(self) -> AsyncIterator[RouteTable]:
        index = 0
        failures = 0
        last: RouteTable | None = None
        while True:
            try:
                returned, services = await self._fetch_services(index, self._wait)
                names = sorted(services)
                answers = await asyncio.gather(*(self._fetch_instances(n) for n in names))
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "Consul catalog watch failed (%s: %s); keeping %d route(s)",
                        type(exc).__name__,
                        exc,
                        len(last.routes) if last is not None else 0,
                    )
                await self._sleep(max(self._backoff.delay(failures, self._rng), self._min_interval))
                continue
            if failures:
                log.info("Consul catalog watch recovered after %d failure(s)", failures)
                failures = 0
            index = next_index(index, returned)
            table = RouteTable.from_catalog(dict(zip(names, answers, strict=True)))
            if table != last:
                last = table
                yield table
            await self._sleep(self._min_interval)

    @classmethod
    def consul(
        cls, settings: ConsulSettings, *, wait: float = 30.0
    ) -> tuple[CatalogWatch, Callable[[], Awaitable[None]]]:
        """A watch on the agent `settings` names, and the close() of its HTTP client."""
        client = settings.client(timeout=wait * 17 / 16 + 5.0)

        async def services(index: int, wait_s: float) -> tuple[int, Mapping[str, Any]]:
            returned, found = await client.catalog.services(
                index=index or None, wait=f"{max(int(wait_s * 1000), 1)}ms"
            )
            return int(returned or 0), dict(found or {})

        async def instances(name: str) -> list[Mapping[str, Any]]:
            _, found = await client.catalog.service(name)
            return list(found or [])

        return cls(services, instances, wait=wait), client.close
