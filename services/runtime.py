"""What every service process sets up around its servicers, in one place: flags, logs with
trace ids, the mesh policy, tracing from OpenTelemetry's environment, the Prometheus endpoint,
the database file, and the MeshServer and mesh channels that use them; and their orderly
release, in reverse order of opening, whatever way the process ends.

    async with ServiceRuntime.started("orders", argv) as runtime:
        store = await runtime.closing(OrdersStore.open(runtime.database_location()))
        catalog = runtime.channel("catalog")
        server = runtime.server()
        server.add_service(...)
        return await server.run()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from opentelemetry import trace
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

import mesh
from mesh.policy import MeshPolicy
from mesh.server import MeshServer, new_instance_id
from mesh.telemetry.logs import configure_logging
from mesh.telemetry.metrics import MeshMetrics
from mesh.telemetry.tracing import Tracing, tracing_from_env
from meshkit.events import (
    Broker,
    EventConsumer,
    EventMetrics,
    Handler,
    OutboxRelay,
    ReceivedEvent,
    StreamSpec,
)
from meshkit.storage.database import Database, DatabaseStore
from meshkit.storage.lease import Leases
from services.cli import (
    ServiceFlags,
    database_location,
    mesh_policy,
    parse_args,
    project_version,
    server_config,
)
from services.crashpoints import crash_switch

log = logging.getLogger(__name__)


class _Closable(Protocol):
    async def close(self) -> None: ...


Closable = TypeVar("Closable", bound=_Closable)


@dataclass
class ServiceRuntime:
    """One service process's shared set-up."""

    args: argparse.Namespace
    instance_id: str
    policy: MeshPolicy
    tracing: Tracing | None
    metrics: MeshMetrics | None
    metrics_port: int | None
    _opened: AsyncExitStack = field(default_factory=AsyncExitStack)

    @classmethod
    @asynccontextmanager
    async def started(
        cls, service: str, argv: Sequence[str] | None, flags: ServiceFlags | None = None
    ) -> AsyncIterator[ServiceRuntime]:
        """The runtime of `service` (see start()), closed with all it opened when the block
        ends."""
        runtime = cls.start(service, argv, flags)
        try:
            yield runtime
        finally:
            await runtime.close()

    @classmethod
    def start(
        cls, service: str, argv: Sequence[str] | None, flags: ServiceFlags | None = None
    ) -> ServiceRuntime:
        """Parse the flags (the shared ones and the service's own `flags`) and set up
        logging, policy, tracing and metrics (exit 2 on a bad flag or policy file, before
        anything is opened)."""
        args = parse_args(service, argv, flags)
        configure_logging(args.log_level, service, json_lines=args.log_json)
        policy = mesh_policy(args)
        instance_id = new_instance_id(service)
        tracing = tracing_from_env(service, instance_id=instance_id)
        metrics = MeshMetrics() if args.metrics else None
        metrics_port = None
        if metrics is not None:
            metrics_port = metrics.start_http_server(args.host, args.metrics_port)
            log.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
        if tracing is not None:
            log.info("exporting traces as %s", instance_id)
        return cls(args, instance_id, policy, tracing, metrics, metrics_port)

    def server(self, interceptors: Sequence[object] = ()) -> MeshServer:
        """The service's MeshServer; `interceptors` run inside the mesh's own."""
        return MeshServer(
            server_config(self.args, version=project_version()),
            tracing=self.tracing,
            metrics=self.metrics,
            metrics_port=self.metrics_port,
            instance_id=self.instance_id,
            interceptors=interceptors,
        )

    def channel(self, service: str) -> mesh.MeshChannel:
        """A mesh channel to `service` with this process's policy, tracing and metrics,
        closed with the runtime."""
        channel = mesh.channel(
            service, policy=self.policy, tracing=self.tracing, metrics=self.metrics
        )
        self._opened.push_async_callback(channel.close)
        return channel

    @functools.cached_property
    def broker(self) -> Broker | None:
        """This process's connection to NATS (`--nats-url`, $NATS_URL), made in the
        background and closed with the runtime; None without a URL: the service's events then
        wait in its outbox, and it consumes none."""
        url = self.args.nats_url
        if not url:
            log.warning("no --nats-url or NATS_URL: events stay in the outbox, none are consumed")
            return None
        broker = Broker(
            url,
            f"{self.args.service_name} {self.instance_id}",
            stream_replicas=self.args.events_replicas,
        )
        broker.start()
        self._opened.push_async_callback(broker.close)
        return broker

    def consume(
        self,
        database: Database,
        stream: StreamSpec,
        event_types: Iterable[type[Message]],
        handlers: Mapping[type[Message], Handler],
        *,
        on_applied: Callable[[ReceivedEvent], Awaitable[None]] | None = None,
    ) -> EventConsumer | None:
        """Apply `stream`'s events to `database` through `handlers`, each once, while the
        runtime runs: the service's durable consumer (named for the service, shared by its
        instances), when NATS is configured."""
        if self.broker is None:
            return None
        consumer = EventConsumer(
            self.broker,
            database,
            stream=stream,
            durable=self.args.service_name,
            event_types=event_types,
            handlers=handlers,
            on_applied=on_applied,
            metrics=self.event_metrics,
            tracer=self.tracer,
            ack_wait=self.args.events_ack_wait,
            before_ack=self._crash_switch("before-ack"),
        )
        self.background(consumer.run(), f"{stream.name} events consumer")
        return consumer

    def publish_outbox(self, database: Database, leases: Leases | None = None) -> None:
        """Relay the events recorded in `database` (its `events` table, the outbox) to the
        service's stream (`orders` -> ORDERS) while the runtime runs, under the outbox's lease
        in `leases` (default: this instance's, 10 s), when NATS is configured."""
        if self.broker is None:
            return
        relay = OutboxRelay(
            database,
            leases if leases is not None else Leases(database, self.instance_id),
            self.broker,
            context=self.args.service_name,
            metrics=self.event_metrics,
            tracer=self.tracer,
            after_publish=self._crash_switch("after-publish"),
        )
        self.background(relay.run(), "outbox relay", then=relay.close)

    def _crash_switch(self, where: str) -> Callable[[object], None] | None:
        try:
            return crash_switch(where)
        except ValueError as error:
            raise SystemExit(f"{self.args.service_name}: {error}") from None

    @functools.cached_property
    def event_metrics(self) -> EventMetrics | None:
        """The outbox's and the consumers' instruments, beside the mesh's."""
        return EventMetrics(self.metrics.registry) if self.metrics is not None else None

    @property
    def tracer(self) -> trace.Tracer | None:
        return self.tracing.tracer if self.tracing is not None else None

    def background(
        self,
        work: Coroutine[object, object, None],
        name: str,
        *,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run `work` (a relay, a consumer) until the runtime closes: it is cancelled then,
        before what was opened earlier (its store) is closed, and `then` runs after it."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        task.add_done_callback(_log_failure)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if then is not None:
                await then()

        self._opened.push_async_callback(stop)

    def database_location(self) -> Path | str:
        """Where this service's instances keep their state: `--database-url` (Postgres), or
        else `<--data-dir>/<service>.db` (SQLite)."""
        return database_location(self.args, self.args.service_name)

    async def closing(self, opening: Awaitable[Closable]) -> Closable:
        """What `opening` opens (a store), closed with the runtime; a store's database
        commits are counted in the metrics (`foodmesh_db_commits_total`)."""
        opened = await opening
        self._opened.push_async_callback(opened.close)
        if self.metrics is not None and isinstance(opened, DatabaseStore):
            commits = _DatabaseCommits(self.args.service_name, opened.database)
            self.metrics.registry.register(commits)
        return opened

    async def close(self) -> None:
        """Close what the runtime opened (last first), flush traces (the exporter blocks:
        off the event loop) and stop the metrics endpoint."""
        await self._opened.aclose()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        if self.metrics is not None:
            self.metrics.stop()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


class _DatabaseCommits(Collector):
    """The write transactions this instance committed to its service's database."""

    def __init__(self, service: str, database: Database) -> None:
        self._service = service
        self._database = database

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "foodmesh_db_commits",
            "Write transactions this instance committed to its service's database.",
            labels=("service",),
        )
        family.add_metric((self._service,), self._database.commits)
        yield family
