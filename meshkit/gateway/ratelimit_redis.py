"""GCRA with its state in Redis, so that every gateway replica counts the same calls.

One Lua script makes each decision atomically inside Redis (read the TAT, decide, write it
with an expiry), on Redis's own clock (`TIME`), so that replicas whose clocks differ still
agree; the arithmetic is meshkit/gateway/ratelimit.py's, in microseconds. A key lives only as
long as its TAT is in the future: idle consumers cost nothing.

Redis is a help, not a dependency: when it cannot answer within a short timeout (down,
restarting, partitioned away), the limiter fails open, allowing the call, logging the first
failure of each outage and counting every one (`foodmesh_gateway_rate_limit_store_errors`),
as Envoy's global rate limit does with `failure_mode_deny: false`. A gateway that refused all
calls because its rate-limit cache was down would turn a cache outage into an outage.
redis-py's asyncio client is the library (the one Redis maintains).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meshkit.gateway.ratelimit import Decision, Limit

log = logging.getLogger(__name__)

_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allowed_at = new_tat - window
if allowed_at > now then
  return {0, 0, allowed_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, math.floor((window - (new_tat - now)) / interval), 0, new_tat - now}
"""
_US = 1_000_000


class RedisLimiter:
    """GCRA decisions made in Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "foodmesh:gateway:rl:",
        timeout: float = 0.25,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._client: Any = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script = self._client.register_script(_SCRIPT)
        self._prefix = prefix
        self._on_error = on_error or (lambda: None)
        self._failing = False
        self.url = url

    async def decide(self, key: str, limit: Limit) -> Decision:
        interval = max(1, round(limit.interval * _US))
        try:
            allowed, remaining, retry_us, reset_us = await self._script(
                keys=[self._prefix + key], args=[interval, interval * limit.burst]
            )
        except (RedisError, OSError) as error:
            self._on_error()
            if not self._failing:
                self._failing = True
                log.warning(
                    "rate-limit store %s unreachable (%s); allowing calls until it is back",
                    self.url,
                    error,
                )
            return Decision(True, limit.burst, 0.0, 0.0)
        if self._failing:
            self._failing = False
            log.info("rate-limit store %s is back", self.url)
        return Decision(bool(allowed), int(remaining), retry_us / _US, reset_us / _US)

    async def close(self) -> None:
        await self._client.aclose()
