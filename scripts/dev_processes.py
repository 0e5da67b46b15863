"""The dev stack's children as the stack sees them: how they are started, where they log, what
it records about each service instance, and the error that ends startup.

Why apart from scripts/processes.py: that module starts and stops any child (the tests use it
too). This one holds what the dev stack's own children have in common, so that the trace
receiver (dev_traces) and the services (dev_stack) start the same way: the project and its
generated stubs on their PYTHONPATH, one log per child emptied at each run, and a StartupFailed
that carries the logs that tell why.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.consul_agent import HOST

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMPORT_ROOTS = (PROJECT_ROOT, PROJECT_ROOT / "protos")
"""What must be importable: the project and its generated stubs (on every child's PYTHONPATH)."""

POLL_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 20.0


class StartupFailed(Exception):
    """The stack could not be brought up; ``logs`` are the logs that tell why."""

    def __init__(self, message: str, logs: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.logs = tuple(logs)


@dataclass
class ServiceProcess:
    """One ``python -m services.<service>`` child and what Consul says about it."""

    name: str
    """``catalog-1``: how the dev stack names it, and its log file's name."""
    service: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    instance_id: str = ""
    address: str = ""
    metrics_port: str = ""
    """Consul meta ``metrics_port``: where its Prometheus endpoint is ("" if it has none)."""
    exit_reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics" if self.metrics_port else ""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def child_env(**variables: str) -> dict[str, str]:
    """Our environment plus ``variables``, with the project importable."""
    env = dict(os.environ, **variables)
    paths = [str(root) for root in IMPORT_ROOTS]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def fresh_log(path: Path) -> Path:
    """Create ``path`` empty, so that each log holds this run only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path
