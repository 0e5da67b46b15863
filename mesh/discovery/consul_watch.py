"""Watching the healthy instances of one service with Consul blocking queries.

The loop follows Consul's documented rules for blocking queries ("Blocking Queries:
Implementation Details" in Consul's API docs):

* reset the index to 0 when it goes backwards (the agent restarted or a snapshot was
  restored), and to 1 when Consul returns an index <= 0, which would turn the loop busy;
* rate-limit the loop so that a query answered at once is not repeated at once;
* use an HTTP timeout longer than wait + wait/16, the jitter Consul adds to `wait`
  (ConsulResolver sizes its client that way).

While Consul is unreachable the last known set is kept: nothing is yielded, so the balancer
keeps serving the endpoints it has. After an outage or an index reset, Consul's view may be
briefly empty while instances re-register (a dev agent loses everything on restart); like
Finagle's stabilised server sets, an empty set is then not trusted over a non-empty one for a
grace period. A genuinely empty service is still reported once that period is over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from mesh.core.backoff import ExponentialBackoff
from mesh.discovery.endpoint import Endpoint
from mesh.discovery.resolver import EndpointSet

log = logging.getLogger(__name__)

# (service, index, wait seconds) -> (X-Consul-Index, entries of /v1/health/service/<service>)
HealthFetch = Callable[[str, int, float], Awaitable[tuple[int, list[Mapping[str, Any]]]]]
# (index, wait seconds) -> (X-Consul-Index, {service name: tags} of /v1/catalog/services)
ServicesFetch = Callable[[int, float], Awaitable[tuple[int, Mapping[str, Any]]]]


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by Consul's rules."""
    if returned <= 0:
        return 1
    if returned < previous:
        return 0
    return returned


def parse_health_entries(entries: Iterable[Mapping[str, Any]]) -> EndpointSet:
    """Endpoints from /v1/health/service entries; the service address wins over the node's."""
    endpoints = set()
    for entry in entries:
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        host = service.get("Address") or node.get("Address") or ""
        try:
            endpoints.add(
                Endpoint(
                    host=host,
                    port=int(service.get("Port") or 0),
                    instance_id=str(service.get("ID") or ""),
                    meta=MappingProxyType(dict(service.get("Meta") or {})),
                    tags=tuple(service.get("Tags") or ()),
                )
            )
        except (TypeError, ValueError) as exc:
            log.warning("ignoring Consul entry %s: %s", service.get("ID", "?"), exc)
    return frozenset(endpoints)


class ConsulWatch:
    """An async iterator over the healthy endpoint sets of one service.

    `fetch`, `clock`, `sleep` and `rng` are injectable so that the rules above are tested
    with scripted responses and a fake clock.
    """

    def __init__(
        self,
        service: str,
        fetch: HealthFetch,
        *,
        wait: float = 30.0,
        min_interval: float = 0.1,
        backoff: ExponentialBackoff = ExponentialBackoff(0.25, 10.0),
        empty_grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if wait <= 0 or min_interval < 0 or empty_grace < 0:
            raise ValueError("wait must be > 0, min_interval and empty_grace >= 0")
        self.service = service
        self._fetch = fetch
        self._wait = wait
        self._min_interval = min_interval
        self._backoff = backoff
        self._empty_grace = empty_grace
        self._clock = clock
        self._sleep = sleep
        self._rng = rng

    async def __aiter__(self) -> AsyncIterator[EndpointSet]:
        index = 0
        failures = 0
        last: EndpointSet | None = None
        distrust_empty_until: float | None = None
        while True:
            started = self._clock()
            wait = self._wait
            if distrust_empty_until is not None:
                wait = max(min(wait, distrust_empty_until - started), self._min_interval, 0.001)
            try:
                returned, entries = await self._fetch(self.service, index, wait)
            except Exception as exc:
                failures += 1
                if failures == 1:
                    kept = len(last) if last is not None else 0
                    log.warning(
                        "Consul watch of %r failed (%s: %s); keeping %d last known endpoint(s)",
                        self.service,
                        type(exc).__name__,
                        exc,
                        kept,
                    )
                delay = self._backoff.delay(failures, self._rng)
                await self._sleep(max(delay, self._min_interval))
                continue
            now = self._clock()
            if failures:
                log.info("Consul watch of %r recovered after %d failure(s)", self.service, failures)
                failures = 0
                distrust_empty_until = now + self._empty_grace
            if returned < index:
                log.info(
                    "Consul index of %r went backwards (%d < %d); resetting",
                    self.service,
                    returned,
                    index,
                )
                distrust_empty_until = now + self._empty_grace
            index = next_index(index, returned)
            endpoints = parse_health_entries(entries)
            if endpoints:
                distrust_empty_until = None
            elif last and distrust_empty_until is not None and now < distrust_empty_until:
                log.info(
                    "Consul reports no healthy %r just after a reset; keeping %d endpoint(s) "
                    "for up to %.1fs",
                    self.service,
                    len(last),
                    distrust_empty_until - now,
                )
                endpoints = last
            else:
                distrust_empty_until = None
            if endpoints != last:
                last = endpoints
                yield endpoints
            elapsed = self._clock() - started
            if elapsed < self._min_interval:
                await self._sleep(self._min_interval - elapsed)
