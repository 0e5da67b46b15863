"""The `meshctl prometheus-sd` run: read Consul once, publish, and with --watch keep
publishing after every change until SIGTERM or Ctrl-C.

The first read must succeed (within --connect-timeout), or the command fails at once with a
message naming the agent: a Prometheus fed from a file that was never written, or an
endpoint that answers an empty list, would look like a mesh with no instances. Once it runs,
Consul going away is not fatal: the last targets stay published and the watch retries,
logging the outage once and the recovery once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mesh.discovery.consul_settings import ConsulSettings
from meshctl.prometheus_sd.targets import TargetGroup, render, target_groups, write_atomically
from meshctl.prometheus_sd.watch import ConsulCatalog, Passing, PassingWatch, read_passing

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

WAIT = 30.0
"""Seconds each blocking query waits for a change before it asks again."""
HTTP_PATHS = ("/", "/targets")
"""Where --listen answers with the target groups (http_sd_configs' `url`)."""


class ConsulUnreachable(Exception):
    """The first read of the catalog failed; the message names the agent and why."""


@dataclass(frozen=True, slots=True)
class SdCommand:
    """`meshctl prometheus-sd`'s flags, checked: with neither `out` nor `listen` the targets
    go to standard output once; `listen` serves them, so it comes with `watch`."""

    consul: ConsulSettings
    out: Path | None = None
    listen: tuple[str, int] | None = None
    watch: bool = False
    connect_timeout: float = 10.0


class HttpSdEndpoint:
    """The targets as an `http_sd_configs` endpoint: GET answers the last published JSON."""

    def __init__(self) -> None:
        self.body = "[]\n"
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> str:
        """Serve on host:port (0: any free port); the URL to give Prometheus."""
        # aiohttp.web loads only here: the rest of meshctl does not pay for its import.
        from aiohttp import web

        async def targets(request: web.Request) -> web.Response:
            return web.Response(text=self.body, content_type="application/json")

        app = web.Application()
        for path in HTTP_PATHS:
            app.router.add_get(path, targets)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"http://{shown}:{bound_port}{HTTP_PATHS[-1]}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def first_read(catalog: ConsulCatalog, timeout: float) -> Passing:
    """Every service's passing instances, or ConsulUnreachable."""
    agent = catalog.settings.http_addr
    try:
        async with asyncio.timeout(timeout):
            return await read_passing(catalog.services, catalog.passing)
    except TimeoutError:
        reason = f"no answer within {timeout:g} s"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    raise ConsulUnreachable(
        f"cannot read the catalog of Consul at {agent} ({reason}); is the agent running? "
        "set CONSUL_HTTP_ADDR or --consul"
    )


async def publish(command: SdCommand, stdout: TextIO) -> None:
    """Run the command; returns after one read, or on SIGTERM/SIGINT with --watch."""
    catalog = ConsulCatalog(command.consul, wait=WAIT)
    endpoint = HttpSdEndpoint() if command.listen is not None else None
    try:
        groups = target_groups(await first_read(catalog, command.connect_timeout))
        if command.out is None and endpoint is None:
            stdout.write(render(groups))
            stdout.flush()
            return
        last = _publish(command, endpoint, groups)
        if endpoint is not None and command.listen is not None:
            url = await endpoint.start(*command.listen)
            log.info("serving Prometheus http_sd at %s", url)
        if not command.watch:
            return

        async def follow() -> None:
            nonlocal last
            async for passing in PassingWatch(catalog.services, catalog.passing, wait=WAIT):
                current = target_groups(passing)
                if current != last:
                    last = _publish(command, endpoint, current)

        await _until_signal(follow())
    finally:
        if endpoint is not None:
            await endpoint.close()
        await catalog.close()


def _publish(
    command: SdCommand, endpoint: HttpSdEndpoint | None, groups: list[TargetGroup]
) -> list[TargetGroup]:
    """Write the file and/or set the endpoint's answer; returns `groups`."""
    text = render(groups)
    if command.out is not None:
        write_atomically(command.out, text)
    if endpoint is not None:
        endpoint.body = text
    services = sorted({group["labels"]["consul_service"] for group in groups})
    log.info(
        "%d target(s) of %s%s",
        len(groups),
        ", ".join(services) or "no service",
        f" written to {command.out}" if command.out is not None else "",
    )
    return groups


async def _until_signal(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` until SIGTERM or SIGINT; its errors propagate."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for pending in (task, stopped):
            pending.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
