"""What docker-compose.yml describes, run as processes on this machine: the multi-host
topology, for real, with each "host" on a loopback address of its own.

    scripts/cluster                 # runs until Ctrl-C (or SIGTERM)
    scripts/cluster --once          # start, place an order through the gateway, stop

Three Consul servers and, per host (`--hosts a,b`), a Consul client agent on the host's own
address (127.0.0.23, .24, ...; everything in 127.0.0.0/8 is this machine) with one instance
of every service bound to that address and registered through that agent, as a container on
that host would be; a three-node NATS JetStream cluster whose streams keep three replicas;
one Postgres with a database and a role per service (each service's DATABASE_URL); a gateway
on the first host. Services find Consul through their host's agent (CONSUL_HTTP_ADDR), NATS
through the list of all three nodes (NATS_URL), their database through DATABASE_URL, as the
compose file and the Kubernetes manifests wire them. What this shows that the dev stack
cannot: a Consul leader lost and elected again, a whole host lost with its agent and
instances, a NATS node lost, instances on two hosts sharing state through one database
(tests/integration/test_cluster.py does each).

It starts tier by tier as the dev stack does (scripts/dev_stack.py's TIERS) and stops the same
way: services with SIGTERM (they deregister), then NATS, Postgres and Consul.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

_PROJECT = str(Path(__file__).resolve().parent.parent)
if _PROJECT not in sys.path:
    sys.path.insert(0, _PROJECT)

from scripts.consul_agent import ConsulAgent  # noqa: E402
from scripts.consul_cluster import ConsulCluster  # noqa: E402
from scripts.dev_processes import child_env, fresh_log  # noqa: E402
from scripts.dev_stack import TIERS  # noqa: E402
from scripts.nats_server import NatsCluster  # noqa: E402
from scripts.postgres_server import PostgresServer  # noqa: E402
from scripts.processes import (  # noqa: E402
    Running,
    free_tcp_port,
    spawn,
    stop_process,
    wait_until,
)

PROJECT_ROOT = Path(_PROJECT)
STATELESS = frozenset({"gateway"})
STREAM_REPLICAS = "3"


@dataclass
class Instance:
    """One service process on one host."""

    host: str
    service: str
    port: int
    proc: Any
    log_path: Path
    bind: str
    """The host's address, which the instance listens on and registers."""
    http_port: int = 0
    """The gateway's HTTP/JSON port (0 for the others)."""

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"


class ClusterStack(Running):
    """Consul servers, a client agent and the platform's instances per host, NATS, Postgres."""

    def __init__(
        self,
        root: Path,
        *,
        hosts: Sequence[str] = ("a", "b"),
        startup_timeout: float = 120.0,
        trip_seconds: float = 20.0,
    ) -> None:
        self.root = root
        self.hosts = tuple(hosts)
        self.startup_timeout = startup_timeout
        self.trip_seconds = trip_seconds
        self.consul = ConsulCluster(root / "consul", hosts=self.hosts)
        self.nats = NatsCluster(root / "nats")
        self.postgres = PostgresServer()
        self.instances: list[Instance] = []
        self.database_urls: dict[str, str] = {}

    # -- starting

    def start(self) -> None:
        """Start Postgres, NATS and Consul, then the services tier by tier on every host;
        return once Consul sees every instance passing."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self.postgres.start()
            self.nats.start()
            self.consul.start()
            for tier in TIERS:
                for service, _ in tier:
                    for host in self.hosts if service not in STATELESS else self.hosts[:1]:
                        self.start_instance(host, service)
                self.wait_passing()
        except BaseException:
            self.stop()
            raise

    def agent(self, host: str) -> ConsulAgent:
        """The Consul client agent of `host`."""
        return self.consul.clients[host]

    def start_instance(self, host: str, service: str, *flags: str) -> Instance:
        """One more instance of `service` on `host`, registered through the host's agent."""
        agent = self.agent(host)
        port = free_tcp_port(agent.host)
        log_path = fresh_log(self.root / "logs" / f"{service}-{host}-{len(self.instances)}.log")
        command = [
            sys.executable, "-m", f"services.{service.replace('-', '_')}",
            "--host", agent.host, "--port", str(port), "--check-interval", "1",
            "--data-dir", str(self.root / "data" / host), *self._flags(service), *flags,
        ]  # fmt: skip
        env = child_env(
            CONSUL_HTTP_ADDR=agent.http_addr,
            NATS_URL=self.nats.url,
            FOODMESH_EVENTS_REPLICAS=STREAM_REPLICAS,
        )
        for variable in ("CONSUL_HTTP_TOKEN", "DATABASE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            env.pop(variable, None)
        if service not in STATELESS:
            if service not in self.database_urls:
                self.database_urls[service] = self.postgres.service_database(service)
            env["DATABASE_URL"] = self.database_urls[service]
        proc = spawn(command, env=env, log_path=log_path, cwd=PROJECT_ROOT)
        instance = Instance(host, service, port, proc, log_path, agent.host)
        if service == "gateway":
            instance.http_port = int(command[command.index("--http-port") + 1])
        self.instances.append(instance)
        return instance

    def _flags(self, service: str) -> list[str]:
        if service == "gateway":
            return ["--http-port", str(free_tcp_port(self.agent(self.hosts[0]).host))]
        if service == "delivery":
            return ["--couriers", "500", "--trip-seconds", f"{self.trip_seconds:g}"]
        return []

    def passing(self, service: str, via: str | None = None) -> set[tuple[str, int]]:
        """(address, port) of `service`'s passing instances, as a host's agent sees them."""
        agent = self.agent(via or self.live_hosts()[0])
        entries = agent.api(f"/v1/health/service/{service}?passing=1", timeout=5.0) or []
        return {(e["Service"]["Address"], e["Service"]["Port"]) for e in entries}

    def wait_passing(self, timeout: float | None = None) -> None:
        """Wait until every running instance passes in Consul."""

        def done() -> bool:
            for instance in self.running():
                if instance.proc.poll() is not None:
                    raise RuntimeError(
                        f"{instance.service} on host {instance.host} exited:\n"
                        + instance.log_path.read_text(errors="replace")[-3000:]
                    )
            return all((i.bind, i.port) in self.passing(i.service) for i in self.running())

        wait_until(
            done,
            timeout=timeout or self.startup_timeout,
            interval=0.2,
            message="not every instance of the cluster passes in Consul",
            ignore=(OSError, ValueError),
        )

    # -- using

    def running(self) -> list[Instance]:
        return [i for i in self.instances if i.proc.poll() is None]

    def live_hosts(self) -> list[str]:
        return [h for h in self.hosts if self.agent(h).is_running]

    def gateway(self) -> Instance:
        return next(i for i in self.running() if i.service == "gateway")

    def metrics_port(self, instance: Instance) -> int | None:
        """The instance's Prometheus port (Consul meta `metrics_port`), None if unlisted."""
        agent = self.agent(instance.host)
        for entry in agent.api(f"/v1/health/service/{instance.service}", timeout=5.0) or []:
            service = entry["Service"]
            if (service["Address"], service["Port"]) == (instance.bind, instance.port):
                port = (service.get("Meta") or {}).get("metrics_port")
                return int(port) if port else None
        return None

    def kill_host(self, host: str) -> list[Instance]:
        """Lose `host` whole: SIGKILL its agent and every instance on it, as a machine that
        loses power; the instances it ran."""
        lost = [i for i in self.running() if i.host == host]
        self.agent(host).kill()
        for instance in lost:
            instance.proc.kill()
        for instance in lost:
            instance.proc.wait(timeout=10)
        return lost

    def describe(self) -> str:
        """Where everything is, for a person."""
        lines = [
            "Consul servers: "
            + ", ".join(f"{s.node_name} {s.http_addr}" for s in self.consul.servers),
            f"  UI: {self.consul.servers[0].ui_url}",
        ]
        for host in self.hosts:
            agent = self.agent(host)
            here = [i for i in self.instances if i.host == host]
            names = ", ".join(f"{i.service} :{i.port}" for i in here)
            lines.append(f"host {host}: agent {agent.http_addr}; {names}")
        lines.append(f"NATS JetStream cluster (streams x{STREAM_REPLICAS}): {self.nats.url}")
        lines.append(f"Postgres: 127.0.0.1:{self.postgres.port}, a database and role per service")
        gateway = self.gateway()
        lines.append(
            f"gateway: grpcurl -plaintext {gateway.address} list   |   "
            f"curl http://{gateway.bind}:{gateway.http_port}/v1/catalog/items"
        )
        return "\n".join(lines)

    # -- stopping

    def stop(self) -> None:
        """Services first (SIGTERM: each deregisters), all at once; then NATS, Postgres,
        Consul."""
        running = [i for i in reversed(self.instances) if i.proc.poll() is None]
        if running:
            with ThreadPoolExecutor(len(running)) as pool:
                list(pool.map(lambda i: stop_process(i.proc, timeout=20), running))
        self.nats.close()
        self.postgres.stop()
        self.consul.stop()


@contextmanager
def cluster_under(root: Path, **options: Any) -> Iterator[ClusterStack]:
    """A started ClusterStack under root, stopped at the end."""
    stack = ClusterStack(root, **options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def smoke(stack: ClusterStack) -> str:
    """A user signs in and places an order through the gateway (gRPC): its status."""
    import grpc

    from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
    from foodmesh.users.v1 import users_pb2, users_pb2_grpc

    with grpc.insecure_channel(stack.gateway().address) as channel:
        users = users_pb2_grpc.UserServiceStub(channel)
        users.CreateUser(
            users_pb2.CreateUserRequest(
                email="cluster@example.com", display_name="Cluster", password="correct horse"
            ),
            timeout=30,
        )
        token = users.Login(
            users_pb2.LoginRequest(email="cluster@example.com", password="correct horse"),
            timeout=30,
        ).access_token
        placed = orders_pb2_grpc.OrderServiceStub(channel).PlaceOrder(
            orders_pb2.PlaceOrderRequest(
                lines=[orders_pb2.OrderLine(item_id="roma-margherita", quantity=1)],
                payment_method="pm_card_visa",
                delivery_address="1 Cluster Street",
                idempotency_key="cluster-smoke",
            ),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=60,
        )
    return str(orders_pb2.OrderStatus.Name(placed.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hosts", default="a,b", help="names of the hosts, comma-separated (default: a,b)"
    )
    parser.add_argument(
        "--once", action="store_true", help="start, place an order through the gateway, stop"
    )
    parser.add_argument("--startup-timeout", type=float, default=120.0, metavar="SECONDS")
    options = parser.parse_args(argv)
    hosts = [h for h in options.hosts.split(",") if h]
    if not hosts or len(set(hosts)) != len(hosts):
        parser.error(f"--hosts: distinct names, got {options.hosts!r}")
    stopping = False

    def interrupted(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    with tempfile.TemporaryDirectory(prefix="foodmesh-cluster-") as tmp:
        started = time.monotonic()
        print(f"starting the cluster in {tmp} ...", flush=True)
        with cluster_under(
            Path(tmp), hosts=hosts, startup_timeout=options.startup_timeout
        ) as stack:
            print(f"up in {time.monotonic() - started:.1f}s\n{stack.describe()}", flush=True)
            print(f"an order through the gateway: {smoke(stack)}", flush=True)
            if not options.once:
                signal.signal(signal.SIGINT, interrupted)
                signal.signal(signal.SIGTERM, interrupted)
                print("Ctrl-C stops it all.", flush=True)
                while not stopping:
                    time.sleep(0.2)
            print("stopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
