"""A real Prometheus (Debian's, built without Consul discovery) scrapes every passing instance
in Consul, found through `meshctl prometheus-sd --watch`: one job reads the file it writes
(file_sd_configs), one asks the endpoint it serves (http_sd_configs). An instance started
later is scraped; one stopped (deregistered) and one killed (still registered, but critical)
are dropped. Without --watch it reads once and prints the same JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from scripts.processes import free_tcp_port, log_tail, spawn, stop_process, wait_until
from scripts.prometheus_server import PrometheusServer
from tests.integration.conftest import PROJECT_ROOT, Stack

JOBS = ("file", "http")
Target = tuple[str, str, str]
"""(service, instance_id, host:metrics_port)"""


def passing_in_consul(stack: Stack) -> set[Target]:
    """Every passing instance with a metrics endpoint, as Consul lists them."""
    found = set()
    for name in stack.agent.api("/v1/catalog/services"):
        for entry in stack.passing(name):
            service = entry["Service"]
            if port := service["Meta"].get("metrics_port"):
                found.add((name, service["ID"], f"{service['Address']}:{port}"))
    return found


def scraped(prometheus: PrometheusServer, job: str) -> set[Target] | None:
    """The job's active targets, or None while any of them is not "up"."""
    targets = [t for t in prometheus.active_targets() if t["labels"]["job"] == job]
    if any(t["health"] != "up" for t in targets):
        return None
    return {
        (t["labels"]["consul_service"], t["labels"]["instance"], urlsplit(t["scrapeUrl"]).netloc)
        for t in targets
    }


def wait_scraped(
    stack: Stack, prometheus: PrometheusServer, *, absent: str = "", timeout: float = 60.0
) -> set[Target]:
    """Wait until each job scrapes exactly Consul's passing instances, all "up" (and none
    with instance id `absent`); that set."""

    def done() -> set[Target]:
        want = passing_in_consul(stack)
        if any(instance_id == absent for _, instance_id, _ in want):
            return set()
        if any(scraped(prometheus, job) != want for job in JOBS):
            return set()
        return want

    try:
        return wait_until(done, timeout=timeout, interval=0.2, message="", ignore=(OSError,))
    except TimeoutError:
        jobs = {job: scraped(prometheus, job) for job in JOBS}
        raise AssertionError(
            f"Consul passes {passing_in_consul(stack)}, Prometheus scrapes {jobs}:\n"
            f"{prometheus.active_targets()}"
        ) from None


@dataclass
class SdRun:
    """A running `meshctl prometheus-sd --watch`: the file it writes, the URL it serves."""

    out: Path
    url: str

    def scrape_configs(self) -> list[dict[str, Any]]:
        """Prometheus's two jobs: "file" reads the file, "http" asks the URL."""
        files = [str(self.out.parent / "*.json")]
        return [
            {"job_name": "file", "file_sd_configs": [{"files": files, "refresh_interval": "1s"}]},
            {"job_name": "http", "http_sd_configs": [{"url": self.url, "refresh_interval": "1s"}]},
        ]


@pytest.fixture
def prometheus_sd(stack: Stack, tmp_path: Path) -> Iterator[SdRun]:
    """`meshctl prometheus-sd --watch` writing targets.json and serving on a free port;
    stopped (SIGTERM) at the end, which it must answer with exit code 0."""
    out = tmp_path / "sd" / "targets.json"
    out.parent.mkdir()
    listen = f"127.0.0.1:{free_tcp_port()}"
    log_path = tmp_path / "prometheus-sd.log"
    command = [sys.executable, "-m", "meshctl", "prometheus-sd", "--watch"]
    command += ["--out", str(out), "--listen", listen]
    proc = spawn(command, env=stack.env(), log_path=log_path, cwd=PROJECT_ROOT)
    try:
        wait_until(
            lambda: out.exists() and "serving Prometheus http_sd" in log_path.read_text(),
            timeout=30,
            message=f"meshctl prometheus-sd did not start:\n{log_tail(log_path)}",
        )
        yield SdRun(out, f"http://{listen}/targets")
    finally:
        code = stop_process(proc)
        assert code == 0, f"meshctl prometheus-sd exited {code}:\n{log_tail(log_path)}"


@pytest.mark.timeout(240)
def test_prometheus_scrapes_every_passing_instance(
    stack: Stack, prometheus_sd: SdRun, tmp_path: Path
) -> None:
    first = [stack.start("users"), stack.start("catalog"), stack.start("catalog")]
    stack.wait_passing("users", 1)
    stack.wait_passing("catalog", {p.port for p in first if p.name == "catalog"})

    with PrometheusServer(
        prometheus_sd.scrape_configs(), log_path=tmp_path / "prometheus.log"
    ) as prometheus:
        assert prometheus.port != 9090
        targets = wait_scraped(stack, prometheus)
        assert {service for service, _, _ in targets} == {"users", "catalog"}
        assert len(targets) == 3
        for target in prometheus.active_targets():
            labels = target["labels"]
            assert labels["node"] == stack.agent.node_name, labels
            assert labels["version"], labels
        # the series keep their own `service` label: no target label pushed it aside
        assert query(prometheus, 'count({service!=""})'), "no series with a service label"
        assert not query(prometheus, 'count({exported_service!=""})')
        # without --out or --listen: one read, printed
        once = subprocess.run(
            [sys.executable, "-m", "meshctl", "prometheus-sd"],
            env=stack.env(),
            cwd=PROJECT_ROOT,
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert json.loads(once.stdout) == json.loads(prometheus_sd.out.read_text())

        third = stack.start("catalog")
        stack.wait_passing("catalog", {p.port for p in stack.processes if p.name == "catalog"})
        targets = wait_scraped(stack, prometheus)
        assert len({t for t in targets if t[0] == "catalog"}) == 3

        # SIGTERM: the instance deregisters (the catalog's index moves)
        stopped = first[1]
        stopped_id = instance_id(stack, "catalog", stopped.port)
        stopped.stop()
        stack.wait_passing("catalog", {first[2].port, third.port})
        targets = wait_scraped(stack, prometheus, absent=stopped_id)
        assert len(targets) == 3

        # SIGKILL: still registered, but its check fails (only its health query moves)
        killed_id = instance_id(stack, "catalog", third.port)
        third.stop(sig=signal.SIGKILL)
        stack.wait_passing("catalog", {first[2].port})
        registered = stack.agent.api("/v1/catalog/service/catalog")
        assert killed_id in {entry["ServiceID"] for entry in registered}
        targets = wait_scraped(stack, prometheus, absent=killed_id)
        assert {t[0] for t in targets} == {"users", "catalog"} and len(targets) == 2


def query(prometheus: PrometheusServer, promql: str) -> list[Any]:
    """The result vector of an instant query."""
    return list(prometheus.api(f"/api/v1/query?query={quote(promql)}")["result"])


def instance_id(stack: Stack, service: str, port: int) -> str:
    return next(
        str(entry["Service"]["ID"])
        for entry in stack.passing(service)
        if entry["Service"]["Port"] == port
    )
