"""A real Consul cluster on one machine: three servers and a client agent per "host", each
node on a loopback address of its own (everything in 127.0.0.0/8 is this machine), for the
tests of what several hosts do and, later, the dev stack's cluster mode.

Why: a dev agent is one node that is also the only server; production is a quorum of servers
(Raft) and a client agent on every host that the host's services register with and ask. What
only a cluster shows (a leader elected again after it dies, a host's agent gone with its
registrations, catalogs that agree across agents) needs a cluster. The nodes are
scripts/consul_agent.py's agents in the "server" and "client" roles; each keeps its Raft and
serf state in its own data dir, so a restarted node rejoins as itself.
"""

from __future__ import annotations

from pathlib import Path

from scripts.consul_agent import ConsulAgent
from scripts.processes import Running, wait_until

FIRST_ADDRESS = 20
"""Nodes get 127.0.0.20, .21, ...: away from 127.0.0.1, where dev agents and services are."""


class ConsulCluster(Running):
    """`servers` Consul servers and one client agent per name in `hosts`."""

    def __init__(self, root: Path, *, servers: int = 3, hosts: tuple[str, ...] = ("a", "b")):
        if servers < 1:
            raise ValueError("a cluster needs at least one server")
        self.root = root
        addresses = (f"127.0.0.{FIRST_ADDRESS + n}" for n in range(servers + len(hosts)))
        self.servers = [
            ConsulAgent(
                log_path=root / f"consul-server-{n}.log",
                node_name=f"server-{n}",
                host=next(addresses),
                role="server",
                bootstrap_expect=servers,
                start_timeout=60.0,
            )
            for n in range(servers)
        ]
        join = tuple(server.serf_lan_addr for server in self.servers)
        for server in self.servers:
            server.retry_join = tuple(a for a in join if a != server.serf_lan_addr)
        self.clients = {
            host: ConsulAgent(
                log_path=root / f"consul-client-{host}.log",
                node_name=f"host-{host}",
                host=next(addresses),
                role="client",
                retry_join=join,
                start_timeout=60.0,
            )
            for host in hosts
        }

    @property
    def nodes(self) -> list[ConsulAgent]:
        return [*self.servers, *self.clients.values()]

    def start(self) -> None:
        """Start every server (none has a leader before a quorum runs), then the clients;
        return once every node knows the leader and sees every other node alive."""
        try:
            for server in self.servers:
                server.start(wait=False)
            for server in self.servers:
                server.wait_ready()
            for client in self.clients.values():
                client.start()
            wait_until(
                lambda: all(self.alive_members(node) == len(self.nodes) for node in self.nodes),
                timeout=60,
                interval=0.2,
                message="not every Consul node sees every other one alive",
                ignore=(OSError, ValueError),
            )
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def alive_members(node: ConsulAgent) -> int:
        members = node.api("/v1/agent/members", timeout=2.0) or []
        return sum(1 for member in members if member.get("Status") == 1)

    def leader(self, via: ConsulAgent | None = None) -> ConsulAgent | None:
        """The server that leads now, as `via` (a running node) sees it."""
        asking = via or next(node for node in self.nodes if node.is_running)
        address = asking.api("/v1/status/leader", timeout=2.0) or ""
        return next((s for s in self.servers if s.server_addr == address), None)

    def stop(self) -> None:
        """Tear the whole cluster down (SIGKILL: nothing of it outlives this, so there is
        no one left to leave gracefully for) and remove the nodes' data."""
        for node in reversed(self.nodes):
            node.kill()
            node.forget()
