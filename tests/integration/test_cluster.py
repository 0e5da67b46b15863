"""The multi-host topology run for real (scripts/cluster_stack.py): three Consul servers, two
"hosts" each with a client agent and an instance of every service on an address of its own,
a three-node NATS JetStream cluster with streams of three replicas, Postgres with a database
per service. What only a cluster shows: instances on two hosts sharing state through one
database, the Consul leader killed under checkout load, a NATS node killed, a whole host
killed (its agent and instances), each counted through the services' own APIs.

The tests share one cluster, in this order; the last one takes a host away."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import mesh
from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.discovery import ConsulSettings
from scripts.cluster_stack import ClusterStack, cluster_under
from scripts.nats_server import NatsCluster
from scripts.processes import stop_process, wait_until
from scripts.prometheus_server import PrometheusServer
from tests.integration.conftest import STATEFUL, order
from tests.integration.platform import (
    CheckoutLoad,
    clients,
    final_order,
    notified_exactly_once,
    until,
)


@dataclass
class Seen:
    """The cluster as the platform helpers use a stack: Consul through host a's agent."""

    settings: ConsulSettings
    nats: NatsCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    # Trips longer than the tests: the notifications counted are the checkouts' outcomes.
    with cluster_under(tmp_path_factory.mktemp("cluster"), trip_seconds=3600) as stack:
        yield stack


def seen_from(cluster: ClusterStack, host: str = "a") -> Seen:
    return Seen(ConsulSettings.parse(cluster.agent(host).http_addr), cluster.nats)


def customer_of(cluster: ClusterStack) -> str:
    """A new user, made through host a's users instance."""
    from foodmesh.users.v1 import users_pb2, users_pb2_grpc

    users = next(i for i in cluster.running() if i.service == "users" and i.host == "a")
    with grpc.insecure_channel(users.address) as channel:
        email = f"{uuid.uuid4().hex[:10]}@example.com"
        user = users_pb2_grpc.UserServiceStub(channel).CreateUser(
            users_pb2.CreateUserRequest(email=email, display_name="c", password="correct horse"),
            timeout=30,
        )
    return str(user.user_id)


async def test_instances_on_both_hosts_share_state_through_postgres(
    cluster: ClusterStack,
) -> None:
    for service in STATEFUL:
        hosts = {address for address, _ in cluster.passing(service, via="b")}
        assert hosts == {cluster.agent("a").host, cluster.agent("b").host}, (service, hosts)
    customer = customer_of(cluster)
    on = {i.host: i for i in cluster.running() if i.service == "orders"}
    with grpc.insecure_channel(on["a"].address) as a, grpc.insecure_channel(on["b"].address) as b:
        placed = orders_pb2_grpc.OrderServiceStub(a).PlaceOrder(
            order(uuid.uuid4().hex, customer=customer), timeout=60
        )
        assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED
        got = orders_pb2_grpc.OrderServiceStub(b).GetOrder(
            orders_pb2.GetOrderRequest(order_id=placed.order_id), timeout=10
        )
    assert got.status == orders_pb2.ORDER_STATUS_CONFIRMED and got.customer_id == customer


def test_prometheus_scrapes_every_instance_of_both_hosts(
    cluster: ClusterStack, tmp_path: Path
) -> None:
    targets = tmp_path / "targets.json"
    env = {**os.environ, "CONSUL_HTTP_ADDR": cluster.agent("a").http_addr}
    written = subprocess.run(
        [sys.executable, "-m", "meshctl", "prometheus-sd", "--out", str(targets)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    instances = {
        f"{i.bind}:{port}"
        for i in cluster.running()
        for port in [cluster.metrics_port(i)]
        if port is not None
    }
    assert len(instances) == len(cluster.running()) == 15
    job = {"job_name": "foodmesh", "file_sd_configs": [{"files": [str(targets)]}]}
    with PrometheusServer([job], log_path=tmp_path / "prometheus.log") as prometheus:

        def scraped_up() -> set[str]:
            return {
                t["scrapeUrl"].split("/")[2]
                for t in prometheus.active_targets()
                if t["health"] == "up"
            }

        wait_until(
            lambda: scraped_up() == instances,
            timeout=60,
            message="Prometheus does not scrape every instance of the cluster",
            ignore=(OSError, ValueError),
        )


async def test_a_nats_node_killed_events_keep_flowing_and_none_is_lost(
    cluster: ClusterStack,
) -> None:
    customer = customer_of(cluster)
    seen = seen_from(cluster)
    async with clients(seen) as c:  # type: ignore[arg-type]
        before = [
            await c.orders.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=60)
            for _ in range(4)
        ]
        cluster.nats.nodes[0].kill()
        after = [
            await c.orders.PlaceOrder(order(uuid.uuid4().hex, customer=customer), timeout=60)
            for _ in range(4)
        ]
    placed = [*before, *after]
    assert {p.status for p in placed} == {orders_pb2.ORDER_STATUS_CONFIRMED}
    await notified_exactly_once(seen, customer, placed, timeout=90)  # type: ignore[arg-type]


async def test_the_consul_leader_killed_under_load_fails_no_checkout(
    cluster: ClusterStack,
) -> None:
    customer = customer_of(cluster)
    seen = seen_from(cluster)
    load = CheckoutLoad(customer)
    async with clients(seen) as c:  # type: ignore[arg-type]
        callers = [asyncio.create_task(load.caller(c.orders)) for _ in range(4)]
        try:
            await until(lambda: len(load.answers) >= 6, "checkouts before the kill")
            leader = cluster.consul.leader()
            assert leader is not None
            leader.kill()
            killed = time.monotonic()
            await until(
                lambda: cluster.consul.leader() not in (None, leader), "a new leader", timeout=60
            )
            elected = time.monotonic() - killed
            answered = len(load.answers)
            await until(lambda: len(load.answers) >= answered + 6, "checkouts after the election")
        finally:
            load.stopping.set()
            await asyncio.gather(*callers)
        for answer in load.answers.values():
            await c.invariant_holds((await final_order(c.orders, answer.order_id)).order_id)
    assert load.failures == [], load.failures
    # Discovery keeps up after the election: an instance that registers now is called.
    async with mesh.channel("catalog", consul=seen.settings) as channel:
        assert await channel.wait_for_endpoints(timeout=30)
        extra = cluster.start_instance("b", "catalog")
        try:
            cluster.wait_passing(timeout=60)
            await until(
                lambda: (extra.bind, extra.port) in {(e.host, e.port) for e in channel.endpoints},
                "the new catalog instance in host a's channel",
            )
        finally:
            stop_process(extra.proc)
    print(
        f"Consul leader killed: a new one in {elected:.1f}s;"
        f" {len(load.answers)} checkouts, 0 failed"
    )


async def test_a_host_killed_whole_leaves_the_other_hosts_channels_and_fails_no_call(
    cluster: ClusterStack,
) -> None:
    seen = seen_from(cluster)
    customer = customer_of(cluster)
    load = CheckoutLoad(customer)
    failed_reads: list[str] = []
    reads = 0
    stopping = asyncio.Event()
    async with (
        clients(seen) as c,  # type: ignore[arg-type]
        mesh.channel("catalog", consul=seen.settings) as catalog_channel,
    ):
        catalog = catalog_pb2_grpc.CatalogServiceStub(catalog_channel)

        async def reader() -> None:
            nonlocal reads
            while not stopping.is_set():
                try:
                    await catalog.GetItem(
                        catalog_pb2.GetItemRequest(item_id="roma-margherita"), timeout=10
                    )
                    reads += 1
                except grpc.aio.AioRpcError as error:
                    failed_reads.append(f"{error.code().name}: {error.details()}")
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(load.caller(c.orders)) for _ in range(3)]
        tasks += [asyncio.create_task(reader()) for _ in range(2)]
        try:
            await until(lambda: len(load.answers) >= 6, "checkouts before the host is lost")
            lost = cluster.kill_host("b")
            killed = time.monotonic()
            gone = {(i.bind, i.port) for i in lost if i.service == "catalog"}
            await until(
                lambda: not gone & {(e.host, e.port) for e in catalog_channel.endpoints},
                "host b's catalog instances out of host a's channel",
                timeout=60,
            )
            left_channel = time.monotonic() - killed
            for service in STATEFUL:
                await until(
                    lambda service=service: (
                        {a for a, _ in cluster.passing(service, via="a")}
                        == {cluster.agent("a").host}
                    ),
                    f"host b's {service} instances out of Consul",
                    timeout=60,
                )
            answered = len(load.answers)
            await until(lambda: len(load.answers) >= answered + 6, "checkouts after the loss")
        finally:
            load.stopping.set()
            stopping.set()
            await asyncio.gather(*tasks)
        for answer in load.answers.values():
            final = await final_order(c.orders, answer.order_id)
            await c.invariant_holds(final.order_id)
    assert failed_reads == [], failed_reads
    assert reads > 0
    failed = [f for f in load.failures if f[1] != grpc.StatusCode.UNAVAILABLE]
    assert failed == [], failed
    print(
        f"host b killed: its instances out of host a's channels in {left_channel:.1f}s; "
        f"{reads} reads, 0 failed; {len(load.answers)} checkouts, "
        f"{len(load.failures)} attempts retried with their keys"
    )
