"""A real ``redis-server`` on a free loopback port, for the tests (the gateway's shared rate
limits).

Why: the shared limiter's atomicity (one Lua script per decision) and its failing open when
Redis goes away are only believable against a real server. The binary is Debian's
``redis-server`` (scripts/bootstrap.sh installs the package when it is missing). It runs in
the foreground with no persistence, so a stop loses its state, as a crashed cache would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from scripts.processes import Running, free_tcp_port, log_tail, spawn, stop_process, wait_until

HOST = "127.0.0.1"


def find_redis_server() -> Path:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server not found: scripts/bootstrap.sh installs Debian's redis-server"
        )
    return Path(found)


class RedisServer(Running):
    """One ``redis-server`` process bound to 127.0.0.1, without persistence."""

    def __init__(self, *, log_path: str | Path, port: int | None = None) -> None:
        self.log_path = Path(log_path)
        self.port = port if port is not None else free_tcp_port(HOST)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            str(find_redis_server()),
            "--bind", HOST,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--dir", str(self.log_path.parent),
        ]  # fmt: skip
        self._proc = spawn(command, log_path=self.log_path)
        wait_until(
            self._ready,
            timeout=timeout,
            interval=0.05,
            message=f"redis-server at {self.url} not ready in {timeout}s",
            ignore=(OSError,),
        )

    def _ready(self) -> bool:
        if not self.is_running:
            raise RuntimeError(f"redis-server exited while starting:\n{log_tail(self.log_path)}")
        with socket.create_connection((HOST, self.port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)
