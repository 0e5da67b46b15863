"""The Resolver backed by Consul: one blocking-query watch per service, one HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from mesh.discovery.consul_settings import ConsulSettings
from mesh.discovery.consul_watch import ConsulWatch
from mesh.discovery.resolver import EndpointSet

if TYPE_CHECKING:
    import consul.aio


class ConsulResolver:
    """Watches healthy (`?passing`) instances in Consul's catalog, via the local agent."""

    def __init__(
        self,
        settings: ConsulSettings | None = None,
        *,
        wait: float = 30.0,
        empty_grace: float = 30.0,
    ) -> None:
        self.settings = settings if settings is not None else ConsulSettings.from_env()
        self._wait = wait
        self._empty_grace = empty_grace
        self._client: consul.aio.Consul | None = None

    def _http(self) -> consul.aio.Consul:
        if self._client is None:
            # Consul adds up to wait/16 of jitter to a blocking query; leave room for it.
            self._client = self.settings.client(timeout=self._wait * 17 / 16 + 5.0)
        return self._client

    async def _fetch(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[Mapping[str, Any]]]:
        returned, entries = await self._http().health.service(
            service, index=index or None, wait=f"{max(int(wait * 1000), 1)}ms", passing=True
        )
        return int(returned or 0), list(entries or [])

    def watch(self, service: str) -> AsyncIterator[EndpointSet]:
        return aiter(
            ConsulWatch(service, self._fetch, wait=self._wait, empty_grace=self._empty_grace)
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
