"""Passing instances in Consul as Prometheus target groups, and writing them atomically.

One group per instance: `<address>:<metrics_port>`, and the labels that
deploy/prometheus/prometheus.yml's `consul_sd_configs` relabelling gives the same instance
(`consul_service`, the Consul name; `instance`, the Consul service ID; `version`, when the
instance registered one), so that a query or a dashboard reads both Prometheus set-ups alike,
plus `node`, the Consul node the instance registered through. Not `service`: every call
metric carries its own `service` label (on a client, the service called), which a target label
of that name would push aside into `exported_service`. The address is the service's own, else
its node's, as discovery takes it (mesh/discovery/consul_watch.py). Instances without a
`metrics_port` meta (Consul itself, or `--no-metrics`) are not targets. The same list is the
body of a `file_sd_configs` file and of an `http_sd_configs` answer: both take
`[{"targets": [...], "labels": {...}}]`.

Prometheus reloads a file as soon as it changes, so a half-written one must never be seen:
the text goes to a temporary file beside it, whose name does not end in `.json` (a
`files: ["dir/*.json"]` pattern does not match it), and is renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mesh.discovery.endpoint import Endpoint

log = logging.getLogger(__name__)

METRICS_PORT_META = "metrics_port"
"""The meta key MeshServer registers its Prometheus port under (mesh/server/mesh_server.py)."""

TargetGroup = dict[str, Any]
"""`{"targets": ["host:port"], "labels": {"consul_service": ..., ...}}`"""


def target_group(service: str, entry: Mapping[str, Any]) -> TargetGroup | None:
    """The group of one `/v1/health/service/<service>` entry; None when the instance has no
    metrics endpoint (or a malformed one, with a warning)."""
    instance = entry.get("Service") or {}
    node = entry.get("Node") or {}
    meta = instance.get("Meta") or {}
    port = meta.get(METRICS_PORT_META)
    if not port:
        return None
    instance_id = str(instance.get("ID") or "")
    try:
        address = Endpoint(
            host=str(instance.get("Address") or node.get("Address") or ""), port=int(port)
        ).address
    except ValueError as exc:
        log.warning("%s (%s): no metrics target: %s", instance_id or "?", service, exc)
        return None
    labels = {
        "consul_service": service,
        "instance": instance_id,
        "node": str(node.get("Node") or ""),
    }
    if version := str(meta.get("version") or ""):
        labels["version"] = version
    return {"targets": [address], "labels": labels}


def target_groups(passing: Mapping[str, Iterable[Mapping[str, Any]]]) -> list[TargetGroup]:
    """The groups of every instance, from health entries keyed by Consul service name, in a
    stable order (by service, then instance id) so that an unchanged catalog gives the same
    text."""
    groups = [
        group
        for service, entries in passing.items()
        for entry in entries
        if (group := target_group(service, entry)) is not None
    ]
    return sorted(groups, key=lambda g: (g["labels"]["consul_service"], g["labels"]["instance"]))


def render(groups: list[TargetGroup]) -> str:
    """The JSON text Prometheus reads (file_sd and http_sd alike)."""
    return json.dumps(groups, indent=2, sort_keys=True) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename; readers see the old file or the new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from a `prometheus` user
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
