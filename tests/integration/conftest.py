"""A real Consul dev agent and real service processes, started as a user starts them.

Every agent and service runs on free ports (never Consul's defaults) and is stopped when the
test ends; children also die with the test process if it crashes (scripts/processes.py).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from foodmesh.orders.v1 import orders_pb2
from mesh.discovery import ConsulSettings
from scripts.consul_agent import ConsulAgent
from scripts.nats_server import NatsServer
from scripts.postgres_server import PostgresServer
from scripts.processes import free_tcp_port, spawn, stop_process, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STATEFUL = ("users", "catalog", "orders", "payments", "delivery", "notifications", "order-history")
"""The services with a database (the gateway keeps none)."""
FAILING = ("--fault-abort", "UNAVAILABLE", "--fault-abort-percent", "100")
"""Flags that make a service instance fail every call (its health checks still pass)."""
MANY_COURIERS = ("--couriers", "1000")
"""delivery flags for tests that place more orders than the default pool has couriers for
(each courier carries one delivery for the whole trip)."""
LONG_TRIPS = (*MANY_COURIERS, "--trip-seconds", "3600")
"""delivery flags for tests that count an order's notifications: no courier picks the food up
while they run (that would be one more notification)."""


@dataclass
class ServiceProcess:
    """One `python -m services.<name>` process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.stopped = True
        return stop_process(self.proc, sig=sig, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Stack:
    """A Consul agent plus the service processes a test starts against it."""

    agent: ConsulAgent
    data_dir: Path
    log_dir: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    nats: NatsServer | None = None
    """The stack's broker, once start_nats() started it; services get its NATS_URL."""
    postgres: PostgresServer | None = None
    """When set, each service started keeps its state in a database of its own there (its
    DATABASE_URL), made for this stack, instead of a SQLite file in data_dir."""
    database_urls: dict[str, str] = field(default_factory=dict)

    def start_nats(self) -> NatsServer:
        """A nats-server with JetStream for the services started from now on, its store in
        the stack's data directory (a restart keeps the streams)."""
        self.nats = NatsServer(store_dir=self.data_dir / "nats", log_path=self.log_dir / "nats.log")
        self.nats.start()
        return self.nats

    @property
    def settings(self) -> ConsulSettings:
        return ConsulSettings.parse(self.agent.http_addr)

    def env(self) -> dict[str, str]:
        # A developer's own Consul token, policy file or OpenTelemetry exporter stays out.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "CONSUL_HTTP_", "FOODMESH_", "NATS_"))
        }
        env["CONSUL_HTTP_ADDR"] = self.agent.http_addr
        if self.nats is not None:
            env["NATS_URL"] = self.nats.url
        return env

    def start(
        self, name: str, *args: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        port = free_tcp_port() if port is None else port
        log_path = self.log_dir / f"{name}-{len(self.processes)}.log"
        command = [
            sys.executable,
            "-m",
            f"services.{name.replace('-', '_')}",  # Consul's order-history: services.order_history
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            "--check-interval",
            "1",
            *args,
        ]
        database = {}
        if self.postgres is not None and name in STATEFUL:
            if name not in self.database_urls:
                self.database_urls[name] = self.postgres.fresh_database(name)
            database["DATABASE_URL"] = self.database_urls[name]
        proc = spawn(
            command,
            env={**self.env(), **database, **(env or {})},
            log_path=log_path,
            cwd=PROJECT_ROOT,
        )
        service = ServiceProcess(name, port, proc, log_path)
        self.processes.append(service)
        return service

    def passing(self, name: str) -> list[dict[str, Any]]:
        """Consul's passing instances of `name` (health entries)."""
        return list(self.agent.api(f"/v1/health/service/{name}?passing=1") or [])

    def passing_ports(self, name: str) -> set[int]:
        return {entry["Service"]["Port"] for entry in self.passing(name)}

    def wait_passing(self, name: str, ports: set[int] | int, timeout: float = 30.0) -> None:
        """Wait until exactly these ports (or this many instances) of `name` pass."""

        def done() -> bool:
            for proc in self.processes:
                if not proc.stopped and proc.proc.poll() is not None:
                    raise RuntimeError(f"{proc.name} on {proc.port} exited:\n{proc.log()[-3000:]}")
            found = self.passing_ports(name)
            return found == ports if isinstance(ports, set) else len(found) == ports

        wait_until(
            done,
            timeout=timeout,
            message=f"{name}: {ports} not passing in Consul",
            ignore=(OSError,),
        )

    def start_platform(
        self,
        *,
        orders: int = 1,
        catalog: int = 1,
        delivery: Sequence[str] = (),
        payments: Sequence[str] = (),
        orders_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> dict[str, list[ServiceProcess]]:
        """users, catalog, payments, delivery and orders, each passing in Consul; `delivery`,
        `payments` and `orders_args` are extra flags of those services, `env` extra
        environment of all.

        It waits until every running instance of these services passes, those started
        before too (catalogs with other flags, say); a service none is started of
        (catalog=0) is not waited for."""
        started = {
            "users": [self.start("users", env=env)],
            "catalog": [self.start("catalog", env=env) for _ in range(catalog)],
            "payments": [self.start("payments", *payments, env=env)],
            "delivery": [self.start("delivery", *delivery, env=env)],
            "orders": [self.start("orders", *orders_args, env=env) for _ in range(orders)],
        }
        for name in started:
            running = {p.port for p in self.processes if p.name == name and not p.stopped}
            if running:
                self.wait_passing(name, running)
        return started

    def customer(self, email: str = "ada@example.com") -> str:
        """A user created through the users service; its user_id."""
        from foodmesh.users.v1 import users_pb2, users_pb2_grpc

        users = next(p for p in self.processes if p.name == "users" and not p.stopped)
        with grpc.insecure_channel(users.address) as channel:
            user = users_pb2_grpc.UserServiceStub(channel).CreateUser(
                users_pb2.CreateUserRequest(
                    email=email, display_name=email.split("@")[0], password="correct horse"
                ),
                timeout=10,
            )
        return str(user.user_id)

    def stop_all(self) -> None:
        """Stop every running process, all at once: each one's drain delay then passes
        together (a platform is seven processes), not one after the other."""
        running = [s for s in reversed(self.processes) if s.proc.poll() is None]
        if running:
            with ThreadPoolExecutor(len(running)) as pool:
                list(pool.map(lambda service: service.stop(), running))
        if self.nats is not None:
            self.nats.close()


def order(
    key: str,
    *,
    customer: str,
    item: str = "roma-margherita",
    quantity: int = 2,
    payment_method: str = "pm_card_visa",
) -> orders_pb2.PlaceOrderRequest:
    """A PlaceOrder request of one line, paid by `payment_method`."""
    return orders_pb2.PlaceOrderRequest(
        customer_id=customer,
        lines=[orders_pb2.OrderLine(item_id=item, quantity=quantity)],
        idempotency_key=key,
        payment_method=payment_method,
        delivery_address="1 Test Street",
    )


def count_orders(stack: Stack) -> int:
    """Orders in the stack's orders database, read from its file (or its Postgres
    database)."""
    if stack.postgres is not None:
        database = stack.database_urls["orders"].rsplit("/", 1)[1]
        return int(stack.postgres.sql("SELECT COUNT(*) FROM order_views", database=database))
    with sqlite3.connect(stack.data_dir / "orders.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM order_views").fetchone()[0])


def engine_of(request: pytest.FixtureRequest) -> PostgresServer | None:
    """The session's Postgres when a fixture parametrized over the engines ("sqlite",
    "postgres") is on "postgres"; None (SQLite files) otherwise."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server
    return None


@contextmanager
def stack_under(root: Path, postgres: PostgresServer | None = None) -> Iterator[Stack]:
    """A Consul agent of its own and a Stack on it, data and logs under root (and its
    databases in `postgres`, when given); all it started is stopped at the end. For stacks
    that a module's tests share."""
    agent = ConsulAgent(log_path=root / "consul.log")
    agent.start()
    (root / "data").mkdir()
    (root / "logs").mkdir()
    running = Stack(agent, root / "data", root / "logs", postgres=postgres)
    try:
        yield running
    finally:
        running.stop_all()
        agent.stop()


@pytest.fixture
def consul_agent(tmp_path: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(log_path=tmp_path / "consul.log")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def stack(consul_agent: ConsulAgent, tmp_path: Path) -> Iterator[Stack]:
    (tmp_path / "data").mkdir()
    (tmp_path / "logs").mkdir()
    running = Stack(consul_agent, tmp_path / "data", tmp_path / "logs")
    try:
        yield running
    finally:
        running.stop_all()
