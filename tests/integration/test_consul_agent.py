"""A real Consul dev agent on free ports: it answers, forgets on restart, leaves nothing behind.

Why: every discovery test stands on ConsulAgent, so its promises are checked against the real
binary first: its address is where the API is, restart() keeps the address but drops the
registrations (the outage that services must survive), and stop/kill/a crashed owner leave no
consul process running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.consul_agent import ConsulAgent
from scripts.processes import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESERVED_PORTS = {8500, 8502, 8600, 4317}


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def accepts_connections(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True


def register(agent: ConsulAgent, name: str, port: int) -> None:
    agent.api(
        "/v1/agent/service/register",
        method="PUT",
        body={"Name": name, "ID": f"{name}-1", "Address": "127.0.0.1", "Port": port},
    )


def catalog_lists(agent: ConsulAgent, name: str) -> bool:
    return name in agent.api("/v1/catalog/services")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ConsulAgent]:
    with ConsulAgent(log_path=tmp_path / "consul.log") as running:
        yield running


def test_agent_answers_on_its_own_free_ports(agent: ConsulAgent) -> None:
    ports = {
        agent.http_port,
        agent.grpc_port,
        agent.serf_lan_port,
        agent.serf_wan_port,
        agent.server_port,
    }
    assert len(ports) == 5
    assert not ports & RESERVED_PORTS
    assert agent.http_addr == f"127.0.0.1:{agent.http_port}"
    assert agent.api("/v1/status/leader")
    config = agent.api("/v1/agent/self")["Config"]
    assert config["NodeName"] == agent.node_name
    assert agent.ui_url == f"http://{agent.http_addr}/ui/"


def test_registered_service_is_listed(agent: ConsulAgent) -> None:
    register(agent, "catalog", 50051)

    assert "catalog-1" in agent.api("/v1/agent/services")
    wait_until(
        lambda: catalog_lists(agent, "catalog"),
        timeout=10,
        message="catalog never listed in /v1/catalog/services",
    )
    [entry] = agent.api("/v1/catalog/service/catalog")
    assert (entry["ServiceAddress"], entry["ServicePort"]) == ("127.0.0.1", 50051)


def test_restart_keeps_the_ports_and_forgets_registrations(agent: ConsulAgent) -> None:
    register(agent, "orders", 50052)
    wait_until(
        lambda: catalog_lists(agent, "orders"),
        timeout=10,
        message="orders never listed in /v1/catalog/services",
    )
    addr, old_pid = agent.http_addr, agent.pid

    agent.restart()

    assert agent.http_addr == addr
    assert agent.pid != old_pid
    assert agent.api("/v1/status/leader")
    assert agent.api("/v1/agent/services") == {}
    assert not catalog_lists(agent, "orders")


def test_stop_leaves_no_process(agent: ConsulAgent) -> None:
    pid = agent.pid
    assert pid is not None and is_alive(pid)

    agent.stop()

    assert not agent.is_running
    assert not is_alive(pid)
    assert not accepts_connections(agent.http_addr)


def test_kill_is_an_outage(agent: ConsulAgent) -> None:
    pid = agent.pid
    assert pid is not None

    assert agent.kill() == -9

    assert not is_alive(pid)
    assert not accepts_connections(agent.http_addr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_agent_dies_with_a_crashed_owner(tmp_path: Path) -> None:
    owner = textwrap.dedent(f"""
        import os
        from scripts.consul_agent import ConsulAgent
        agent = ConsulAgent(log_path={str(tmp_path / "consul.log")!r})
        agent.start()
        print(agent.pid, flush=True)
        os._exit(1)  # a crash: no stop(), no atexit
    """)
    done = subprocess.run(
        [sys.executable, "-c", owner],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    pid = int(done.stdout.strip())

    wait_until(
        lambda: not is_alive(pid),
        timeout=10,
        message=f"consul agent {pid} outlived its crashed owner",
    )
