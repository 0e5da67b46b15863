"""Registering one service instance with the local Consul agent, and keeping it registered.

The agent owns the registration: it runs the GRPC health check against the instance's own
grpc.health.v1 service and syncs the catalog. A dev agent that restarts forgets everything,
and an agent can be unreachable when the instance starts, so a keeper task asks the agent
every few seconds whether it still knows the instance and registers it again when it does
not; no restart of the service is needed. All HTTP goes through py-consul's asyncio client:
nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mesh.core.backoff import ExponentialBackoff
from mesh.discovery.consul_settings import ConsulSettings

if TYPE_CHECKING:
    import consul.aio

log = logging.getLogger(__name__)

_META_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """What Consul is told about one instance (validated against Consul's own limits)."""

    name: str
    instance_id: str
    host: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    check_interval: float = 2.0
    check_timeout: float = 1.0
    deregister_critical_after: float = 60.0

    def __post_init__(self) -> None:
        if not self.name or not self.instance_id:
            raise ValueError("service name and instance id must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"service port must be in 1..65535, got {self.port}")
        if self.check_interval <= 0 or self.check_timeout <= 0:
            raise ValueError("check interval and timeout must be > 0")
        if len(self.meta) > 64:
            raise ValueError("Consul allows at most 64 meta keys")
        for key, value in self.meta.items():
            if not key or len(key) > 128 or not set(key) <= _META_KEY_CHARS:
                raise ValueError(f"meta key {key!r}: Consul wants 1-128 of [A-Za-z0-9_-]")
            if len(value) > 512:
                raise ValueError(f"meta value of {key!r} is longer than Consul's 512 characters")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def check(self) -> dict[str, Any]:
        """A GRPC check against the instance's grpc.health.v1 service (whole server)."""
        return {
            "Name": f"gRPC health of {self.name}",
            "GRPC": self.address,
            "Interval": _duration(self.check_interval),
            "Timeout": _duration(self.check_timeout),
            # Consul reaps critical services no sooner than a minute, every 30 s.
            "DeregisterCriticalServiceAfter": _duration(max(self.deregister_critical_after, 60.0)),
        }


class ConsulRegistration:
    """Registers `instance`, keeps it registered, and deregisters it on `close()`."""

    def __init__(
        self,
        instance: ServiceInstance,
        settings: ConsulSettings | None = None,
        *,
        recheck_interval: float = 2.0,
        request_timeout: float = 5.0,
        backoff: ExponentialBackoff = ExponentialBackoff(0.25, 5.0),
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.instance = instance
        self.settings = settings if settings is not None else ConsulSettings.from_env()
        self._recheck_interval = recheck_interval
        self._request_timeout = request_timeout
        self._backoff = backoff
        self._rng = rng
        self._client: consul.aio.Consul | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.registrations = 0

    def _http(self) -> consul.aio.Consul:
        if self._client is None:
            self._client = self.settings.client(timeout=self._request_timeout)
        return self._client

    async def register(self) -> None:
        """One registration attempt; raises on failure."""
        inst = self.instance
        await self._http().agent.service.register(
            inst.name,
            service_id=inst.instance_id,
            address=inst.host,
            port=inst.port,
            tags=list(inst.tags),
            meta=dict(inst.meta),
            check=inst.check(),
        )
        self.registrations += 1
        log.info(
            "registered %s (%s) at %s with Consul at %s",
            inst.instance_id,
            inst.name,
            inst.address,
            self.settings.http_addr,
        )

    async def is_registered(self) -> bool:
        """Whether the local agent still knows this instance."""
        services = await self._http().agent.services()
        return self.instance.instance_id in (services or {})

    async def start(self) -> None:
        """Start the keeper task; it registers as soon as the agent answers."""
        if self._keeper is None:
            self._keeper = asyncio.create_task(
                self._keep_registered(), name=f"consul-keeper-{self.instance.instance_id}"
            )

    async def _keep_registered(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if not await self.is_registered():
                    if self.registrations:
                        log.warning(
                            "Consul agent forgot %s; registering again", self.instance.instance_id
                        )
                    await self.register()
                if failures:
                    log.info("Consul agent at %s reachable again", self.settings.http_addr)
                failures = 0
                pause = self._recheck_interval
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "Consul agent at %s: cannot keep %s registered (%s: %s); retrying",
                        self.settings.http_addr,
                        self.instance.instance_id,
                        type(exc).__name__,
                        exc,
                    )
                pause = max(self._backoff.delay(failures, self._rng), 0.05)
            try:
                await asyncio.wait_for(self._stopping.wait(), pause)
            except TimeoutError:
                pass

    async def deregister(self) -> bool:
        """Stop the keeper and remove the instance from the agent; False if Consul said no."""
        self._stopping.set()
        if self._keeper is not None:
            await self._keeper
            self._keeper = None
        try:
            await self._http().agent.service.deregister(self.instance.instance_id)
        except Exception as exc:
            log.warning(
                "could not deregister %s from Consul at %s (%s: %s)",
                self.instance.instance_id,
                self.settings.http_addr,
                type(exc).__name__,
                exc,
            )
            return False
        log.info("deregistered %s from Consul", self.instance.instance_id)
        return True

    async def close(self) -> None:
        """Stop the keeper (without deregistering) and close the HTTP client."""
        self._stopping.set()
        if self._keeper is not None:
            await self._keeper
            self._keeper = None
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _duration(seconds: float) -> str:
    """A Go duration string, as Consul's API takes it."""
    return f"{max(round(seconds * 1000), 1)}ms"
