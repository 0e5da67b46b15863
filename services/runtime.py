"""What every service process sets up around its servicers, in one place: flags, logs with
trace ids, the mesh policy, tracing from OpenTelemetry's environment, the Prometheus endpoint,
and the MeshServer and mesh channels that use them; and their orderly release.

    runtime = ServiceRuntime.start("orders", argv)
    catalog = runtime.channel("catalog")
    server = runtime.server()
    ...
    await runtime.close()
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import mesh
from mesh.policy import MeshPolicy
from mesh.server import MeshServer, new_instance_id
from mesh.telemetry.logs import configure_logging
from mesh.telemetry.metrics import MeshMetrics
from mesh.telemetry.tracing import Tracing, tracing_from_env
from services.cli import mesh_policy, parse_args, project_version, server_config

log = logging.getLogger(__name__)


@dataclass
class ServiceRuntime:
    """One service process's shared set-up."""

    args: argparse.Namespace
    instance_id: str
    policy: MeshPolicy
    tracing: Tracing | None
    metrics: MeshMetrics | None
    metrics_port: int | None

    @classmethod
    def start(cls, service: str, argv: Sequence[str] | None) -> ServiceRuntime:
        """Parse the flags and set up logging, policy, tracing and metrics (exit 2 on a bad
        flag or policy file, before anything is opened)."""
        args = parse_args(service, argv)
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

    def server(self) -> MeshServer:
        return MeshServer(
            server_config(self.args, version=project_version()),
            tracing=self.tracing,
            metrics=self.metrics,
            metrics_port=self.metrics_port,
            instance_id=self.instance_id,
        )

    def channel(self, service: str) -> mesh.MeshChannel:
        """A mesh channel to `service` with this process's policy, tracing and metrics."""
        return mesh.channel(service, policy=self.policy, tracing=self.tracing, metrics=self.metrics)

    async def close(self) -> None:
        """Flush traces (the exporter blocks: off the event loop) and stop the endpoint."""
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        if self.metrics is not None:
            self.metrics.stop()
