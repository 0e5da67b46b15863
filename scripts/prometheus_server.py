"""A real ``prometheus`` on a free loopback port, for the tests (scraping every instance).

Why: that every instance Consul knows is scraped is only believable when a real Prometheus
discovers and scrapes them. The binary is Debian's ``prometheus`` (scripts/bootstrap.sh
installs the package when it is missing); Debian builds it without ``consul_sd_configs``, so
its targets come from ``file_sd_configs`` or ``http_sd_configs``, which ``meshctl
prometheus-sd`` feeds from Consul. Each server gets its own port (never 9090), its own
configuration and its own TSDB directory, removed by ``close()``.

The configuration is written as JSON, which is YAML too: no YAML library is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.processes import Running, free_tcp_port, log_tail, spawn, stop_process, wait_until

HOST = "127.0.0.1"
# Prometheus is on loopback: never route its API through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_prometheus() -> Path:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError(
            "prometheus not found: scripts/bootstrap.sh installs Debian's prometheus package"
        )
    return Path(found)


class PrometheusServer(Running):
    """One ``prometheus`` process bound to 127.0.0.1 that scrapes `scrape_configs`.

    Usage::

        jobs = [{"job_name": "mesh", "file_sd_configs": [{"files": [str(tmp_path / "*.json")]}]}]
        with PrometheusServer(jobs, log_path=tmp_path / "prometheus.log") as prometheus:
            prometheus.active_targets()
    """

    def __init__(
        self,
        scrape_configs: Sequence[Mapping[str, Any]],
        *,
        log_path: str | Path,
        port: int | None = None,
        scrape_interval: str = "1s",
    ) -> None:
        self.scrape_configs = [dict(job) for job in scrape_configs]
        self.scrape_interval = scrape_interval
        self.log_path = Path(log_path)
        self.port = port if port is not None else free_tcp_port(HOST)
        self._work: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration file's content: every job scraped each `scrape_interval`."""
        interval = self.scrape_interval
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": self.scrape_configs,
        }

    def start(self, timeout: float = 30.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._work = tempfile.TemporaryDirectory(prefix="prometheus-")
        work = Path(self._work.name)
        config = work / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))
        command = [
            str(find_prometheus()),
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
        ]
        self._proc = spawn(command, log_path=self.log_path, cwd=work)
        wait_until(
            self._ready,
            timeout=timeout,
            interval=0.1,
            message=f"prometheus at {self.url} not ready in {timeout}s",
            ignore=(OSError,),
        )

    def _ready(self) -> bool:
        if not self.is_running:
            raise RuntimeError(f"prometheus exited while starting:\n{log_tail(self.log_path)}")
        with _OPENER.open(f"{self.url}/-/ready", timeout=2.0) as response:
            return bool(response.status == 200)

    def api(self, path: str, timeout: float = 5.0) -> Any:
        """The `data` of a GET on Prometheus's HTTP API (`/api/v1/...`)."""
        with _OPENER.open(f"{self.url}{path}", timeout=timeout) as response:
            answer = json.load(response)
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {answer}")
        return answer["data"]

    def active_targets(self) -> list[dict[str, Any]]:
        """`/api/v1/targets`' active targets: labels, scrapeUrl, health ("up", "down",
        "unknown"), lastError, per job (`labels["job"]`)."""
        return list(self.api("/api/v1/targets?state=active")["activeTargets"])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def close(self) -> None:
        self.stop()
        work, self._work = self._work, None
        if work is not None:
            work.cleanup()
