"""A real ``consul agent -dev`` on free loopback ports, for the tests and the dev stack.

Why: discovery is only believable against a real Consul. A dev agent is a one-node server that
keeps everything in memory and starts in well under a second. Every port is chosen free (DNS is
off) so that agents of parallel runs, and a developer's own agent on 8500/8502/8600, never
collide. The ports are fixed for the object's lifetime, so ``restart()`` brings back an agent
at the same address that has forgotten every registration, which is how the tests check that
services register again.

The agent runs in an empty private directory: Consul 1.8 in dev mode has no data dir and reads
persisted ``services/`` and ``checks/`` relative to its working directory, which here would be
our own ``services/`` package. Only flags that Consul 1.8 knows are used (Debian bullseye ships
1.8.7, see ``get_consul``). HTTP is spoken with urllib, so no dependency is needed.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from scripts.get_consul import ensure_consul
from scripts.processes import Running, free_tcp_port, log_tail, spawn, stop_process, wait_until

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
# The agent is on loopback: never route its API through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _distinct_free_ports(count: int, avoid: int | None) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_tcp_port(HOST)
        if port != avoid and port not in ports:
            ports.append(port)
    return ports


class ConsulAgent(Running):
    """One ``consul agent -dev`` process bound to 127.0.0.1.

    Usage::

        with ConsulAgent(log_path=tmp_path / "consul.log") as agent:
            os.environ["CONSUL_HTTP_ADDR"] = agent.http_addr
    """

    def __init__(
        self,
        *,
        log_path: str | Path,
        http_port: int | None = None,
        node_name: str | None = None,
        binary: str | Path | None = None,
        start_timeout: float = 30.0,
        host: str = HOST,
        role: str = "dev",
        bootstrap_expect: int = 3,
        retry_join: tuple[str, ...] = (),
    ) -> None:
        """`role` "dev" is a one-node dev agent; "server" and "client" are nodes of a real
        cluster (scripts/consul_cluster.py) on `host`, a loopback address of their own, that
        join `retry_join` (serf LAN addresses) and keep their state in a data dir."""
        if role not in ("dev", "server", "client"):
            raise ValueError(f"role must be dev, server or client, got {role!r}")
        self.host = host
        self.role = role
        self.bootstrap_expect = bootstrap_expect
        self.retry_join = retry_join
        self.log_path = Path(log_path)
        self.node_name = node_name or f"foodmesh-{uuid.uuid4().hex[:8]}"
        self.binary = Path(binary) if binary is not None else ensure_consul()
        self.start_timeout = start_timeout
        free = _distinct_free_ports(5, avoid=http_port)
        self.http_port = http_port if http_port is not None else free[4]
        self.grpc_port, self.serf_lan_port, self.serf_wan_port, self.server_port = free[:4]
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def http_addr(self) -> str:
        """``host:port`` of the HTTP API: the value for ``CONSUL_HTTP_ADDR``."""
        return f"{self.host}:{self.http_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.http_addr}/ui/"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def serf_lan_addr(self) -> str:
        """What other nodes join (`-retry-join`)."""
        return f"{self.host}:{self.serf_lan_port}"

    @property
    def server_addr(self) -> str:
        """The address /v1/status/leader names when this server leads."""
        return f"{self.host}:{self.server_port}"

    def command(self) -> list[str]:
        if self.role == "dev":
            mode = ["-dev"]
        else:
            assert self._workdir is not None
            mode = [f"-data-dir={Path(self._workdir.name) / 'data'}"]
            if self.role == "server":
                mode += ["-server", f"-bootstrap-expect={self.bootstrap_expect}", "-ui"]
                # Raft's timeouts as Consul recommends for production on fast links (the
                # default multiplier, 5, is for slow cloud machines): a new leader in
                # seconds, not tens of seconds.
                mode += ["-hcl=performance { raft_multiplier = 1 }"]
            mode += [f"-retry-join={address}" for address in self.retry_join]
            mode += ["-retry-interval=1s"]
        return [
            str(self.binary),
            "agent",
            *mode,
            f"-bind={self.host}",
            f"-client={self.host}",
            f"-node={self.node_name}",
            f"-http-port={self.http_port}",
            f"-grpc-port={self.grpc_port}",
            f"-serf-lan-port={self.serf_lan_port}",
            f"-serf-wan-port={self.serf_wan_port}",
            f"-server-port={self.server_port}",
            "-dns-port=-1",
        ]

    def start(self, *, wait: bool = True) -> None:
        """Start the agent; return once it has a leader and its agent API answers (at once
        with `wait` False: a cluster's servers have no leader until enough have started).

        Call it from a long-lived thread: the agent dies with the thread that spawned it.
        """
        if self.is_running:
            raise RuntimeError(f"consul agent {self.node_name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._workdir is None:  # a cluster node keeps its data dir across a restart
            self._workdir = tempfile.TemporaryDirectory(prefix=f"consul-{self.role}-")
        self._proc = spawn(self.command(), log_path=self.log_path, cwd=self._workdir.name)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until the agent knows a leader and its agent API answers."""
        try:
            wait_until(
                self._ready,
                timeout=self.start_timeout,
                interval=0.1,
                message=f"consul agent at {self.http_addr} not ready in {self.start_timeout}s",
                ignore=(OSError, http.client.HTTPException, ValueError),
            )
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            tail = self.log_tail()
            raise RuntimeError(f"{exc}\n--- tail of {self.log_path} ---\n{tail}") from exc

    def _ready(self) -> bool:
        if not self.is_running:
            code = self._proc.returncode if self._proc is not None else None
            raise RuntimeError(f"consul agent exited with code {code} while starting")
        return bool(self.api("/v1/status/leader", timeout=1.0)) and bool(
            self.api("/v1/agent/self", timeout=1.0)
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the agent (SIGTERM, then SIGKILL after ``timeout``); its exit code.

        Consul 1.8 exits with code 1 on SIGTERM ("Graceful shutdown disabled").
        """
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL the agent at once, as an outage would."""
        return self._end(signal.SIGKILL, timeout=10.0)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc, self._proc = self._proc, None
        code = stop_process(proc, sig=sig, timeout=timeout) if proc is not None else None
        if self.role == "dev":
            self.forget()
        return code

    def forget(self) -> None:
        """Remove the agent's working directory (a dev agent's at every stop; a cluster
        node's when the cluster is torn down)."""
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            workdir.cleanup()

    def restart(self) -> None:
        """Stop and start again on the same ports; a dev agent forgets all registrations."""
        self.stop()
        self.start()

    def api(self, path: str, *, method: str = "GET", body: Any = None, timeout: float = 5.0) -> Any:
        """Call the agent's HTTP API; the decoded JSON answer (None for an empty body)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.http_addr}{path}", data=data, method=method)
        with _OPENER.open(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload.strip() else None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)
