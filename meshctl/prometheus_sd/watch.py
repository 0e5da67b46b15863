"""Following the passing instances of every service in Consul, as Prometheus's own Consul
discovery does: one blocking query on `/v1/catalog/services` for the list of services, and one
per service on `/v1/health/service/<name>?passing`.

Why both: the catalog's index moves when an instance registers or deregisters, not when its
check fails, and an instance that is killed stays registered, critical, for a minute before
Consul reaps it; its health query moves at once. Why not ConsulWatch, the mesh's own watch of
one service: it yields endpoints, whose identity is the address alone and which carry no
node, while a target's labels need the Consul node and every instance id. The blocking-query
rules are the same ones (`next_index`: the index reset when it goes backwards; the loop
rate-limited; backoff while Consul is unreachable, keeping the last answers).

A snapshot is yielded only once every listed service has answered, so a reader never sees a
service's targets missing because its first query is still on the way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from mesh.core.backoff import ExponentialBackoff
from mesh.discovery.consul_settings import ConsulSettings
from mesh.discovery.consul_watch import HealthFetch, ServicesFetch, next_index

if TYPE_CHECKING:
    import consul.aio

log = logging.getLogger(__name__)

Answer = TypeVar("Answer")
Entries = list[Mapping[str, Any]]
Passing = dict[str, Entries]
"""Health entries of the passing instances, keyed by Consul service name."""


async def read_passing(fetch_services: ServicesFetch, fetch_health: HealthFetch) -> Passing:
    """Every service's passing instances, read once (no blocking); raises what the reads
    raise."""
    _, services = await fetch_services(0, 0.0)
    names = sorted(services)
    answers = await asyncio.gather(*(fetch_health(name, 0, 0.0) for name in names))
    return {name: entries for name, (_, entries) in zip(names, answers, strict=True)}


class PassingWatch:
    """An async iterator over `Passing` snapshots, one after each change.

    The fetches, `sleep` and `rng` are injectable so that the loop is tested with scripted
    answers; `ConsulCatalog` gives the real fetches.
    """

    def __init__(
        self,
        fetch_services: ServicesFetch,
        fetch_health: HealthFetch,
        *,
        wait: float = 30.0,
        min_interval: float = 0.1,
        backoff: ExponentialBackoff = ExponentialBackoff(0.25, 10.0),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if wait <= 0 or min_interval < 0:
            raise ValueError("wait must be > 0 and min_interval >= 0")
        self._fetch_services = fetch_services
        self._fetch_health = fetch_health
        self._wait = wait
        self._min_interval = min_interval
        self._backoff = backoff
        self._sleep = sleep
        self._rng = rng

    async def __aiter__(self) -> AsyncIterator[Passing]:
        passing: Passing = {}
        listed: set[str] | None = None
        followers: dict[str, asyncio.Task[None]] = {}
        changed = asyncio.Event()

        async def follow_service(name: str) -> None:
            fetch = functools.partial(self._fetch_health, name)
            async for entries in self._follow(f"service {name!r}", fetch):
                passing[name] = entries
                changed.set()

        async def follow_list() -> None:
            nonlocal listed
            async for services in self._follow("the service list", self._fetch_services):
                listed = set(services)
                for name in followers.keys() - listed:
                    followers.pop(name).cancel()
                    passing.pop(name, None)
                for name in sorted(listed - followers.keys()):
                    followers[name] = asyncio.create_task(
                        follow_service(name), name=f"prometheus-sd-{name}"
                    )
                changed.set()

        lister = asyncio.create_task(follow_list(), name="prometheus-sd-services")
        try:
            while True:
                await changed.wait()
                changed.clear()
                if listed is not None and listed <= passing.keys():
                    yield {name: passing[name] for name in sorted(listed)}
        finally:
            tasks = [lister, *followers.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(
        self, what: str, fetch: Callable[[int, float], Awaitable[tuple[int, Answer]]]
    ) -> AsyncIterator[Answer]:
        """Each answer of one blocking query (one whose wait timed out repeats the last)."""
        index, failures = 0, 0
        while True:
            try:
                returned, answer = await fetch(index, self._wait)
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "Consul watch of %s failed (%s: %s); keeping the last answer",
                        what,
                        type(exc).__name__,
                        exc,
                    )
                await self._sleep(max(self._backoff.delay(failures, self._rng), self._min_interval))
                continue
            if failures:
                log.info("Consul watch of %s recovered after %d failure(s)", what, failures)
                failures = 0
            yield answer
            index = next_index(index, returned)
            await self._sleep(self._min_interval)


class ConsulCatalog:
    """The two reads on py-consul's asyncio client (create it with an event loop running)."""

    def __init__(self, settings: ConsulSettings, *, wait: float = 30.0) -> None:
        self.settings = settings
        # Consul adds up to wait/16 of jitter to a blocking query; leave room for it.
        self._client: consul.aio.Consul = settings.client(timeout=wait * 17 / 16 + 5.0)

    async def services(self, index: int, wait: float) -> tuple[int, Mapping[str, Any]]:
        returned, found = await self._client.catalog.services(index=index or None, wait=_wait(wait))
        return int(returned or 0), dict(found or {})

    async def passing(self, service: str, index: int, wait: float) -> tuple[int, Entries]:
        returned, found = await self._client.health.service(
            service, index=index or None, wait=_wait(wait), passing=True
        )
        return int(returned or 0), list(found or [])

    async def close(self) -> None:
        await self._client.close()


def _wait(seconds: float) -> str | None:
    """Consul's `wait` parameter; None (no blocking) for a read at index 0."""
    return f"{max(int(seconds * 1000), 1)}ms" if seconds > 0 else None
