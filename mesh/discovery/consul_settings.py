"""Where the Consul agent is, read from Consul's own environment variables.

`CONSUL_HTTP_ADDR` (`host:port`, `http://host:port` or `https://host:port`; default
127.0.0.1:8500) and `CONSUL_HTTP_TOKEN`, exactly as the consul CLI reads them, so that a
service, the dev stack and `consul members` all agree on the agent. Parsing is ours rather
than py-consul's so that a bad value is refused with a message naming the variable, and so
that tests can pass explicit settings without touching the process environment.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import consul.aio

DEFAULT_ADDR = "127.0.0.1:8500"


@dataclass(frozen=True, slots=True)
class ConsulSettings:
    """How to reach one Consul agent's HTTP API."""

    host: str = "127.0.0.1"
    port: int = 8500
    scheme: str = "http"
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"CONSUL_HTTP_ADDR: scheme must be http or https, got {self.scheme!r}")
        if not self.host:
            raise ValueError("CONSUL_HTTP_ADDR: host must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"CONSUL_HTTP_ADDR: port must be in 1..65535, got {self.port}")

    @property
    def http_addr(self) -> str:
        """The value of CONSUL_HTTP_ADDR that points at this agent."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @classmethod
    def parse(cls, addr: str, token: str | None = None) -> ConsulSettings:
        """Parse a CONSUL_HTTP_ADDR value; ValueError naming the variable when malformed."""
        text = addr.strip()
        if "://" not in text:
            text = "http://" + text
        parsed = urllib.parse.urlsplit(text)
        try:
            port = parsed.port
        except ValueError as exc:
            raise ValueError(f"CONSUL_HTTP_ADDR={addr!r}: invalid port") from exc
        if not parsed.hostname:
            raise ValueError(f"CONSUL_HTTP_ADDR={addr!r}: expected host:port or scheme://host:port")
        default_port = 443 if parsed.scheme == "https" else 8500
        return cls(parsed.hostname, port or default_port, parsed.scheme, token or None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConsulSettings:
        """Settings from CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN (defaults when unset)."""
        env = os.environ if environ is None else environ
        return cls.parse(env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR, env.get("CONSUL_HTTP_TOKEN"))

    def client(self, *, timeout: float) -> consul.aio.Consul:
        """A py-consul asyncio client; `timeout` bounds every HTTP request it makes.

        Must be called with an event loop running (aiohttp binds its session to it).
        py-consul (and aiohttp under it) is imported here, not at module load: a process
        that never talks to Consul (a StaticResolver, `meshctl load host:port`) does not
        pay its import.
        """
        import consul.aio

        client = consul.aio.Consul(
            host=self.host,
            port=self.port,
            scheme=self.scheme,
            token=self.token,
            connections_timeout=timeout,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; ours is authoritative.
        client.token = self.token
        return client
