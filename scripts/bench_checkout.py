"""What the checkout saga itself costs: a checkout through orders against the same participant
calls made directly, in one run, and `meshctl load` on PlaceOrder at -c 8.

    python -m scripts.bench_checkout                    # 4 rounds x 5 s per side, c=8
    python -m scripts.bench_checkout --rounds 2 --duration 3 --json

How: a Consul dev agent and the platform's processes on free ports in a temporary directory
(users, catalog, payments, delivery with couriers for every order, two orders instances, as
the dev stack runs them, or `--orders-instances N`), and a customer. Two sides, each
`--concurrency` tasks calling in a loop for `--duration`, in alternating rounds after a
warm-up, on mesh channels from this process:

    checkout  PlaceOrder (a fresh idempotency key each): orders checks the customer and
              prices the line, at once, then the saga's three steps, each recorded
    direct    the same participant calls one after the other from here: GetUser, GetItem,
              AuthorizePayment, ScheduleDelivery, CapturePayment (each with its own key)

checkout / direct at p50 is what the orchestration adds (persistence, leases, bookkeeping,
one more hop); the goal is at most 1.20. `direct` makes the calls one after the other while
orders makes the first two at once, so the ratio is a little kind to orders, by one GetItem.
The database writes per checkout come from each service's `foodmesh_db_commits_total`. Then
`meshctl load` runs against the same stack with -c 8 for `--duration` x 2, and its summary is
printed: calls/s, p50, p99, errors. Both sides share the machine's cores with the services,
so only the ratio within one run means anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import mesh
from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.discovery import ConsulSettings
from scripts.bench_harness import percentile
from scripts.consul_agent import ConsulAgent
from scripts.processes import free_tcp_port, spawn, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[1]
ITEM = "roma-margherita"
SERVICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("users", ()),
    ("catalog", ()),
    ("payments", ()),
    ("delivery", ("--couriers", "1000000", "--trip-seconds", "3600")),
)
ORDERS: tuple[str, tuple[str, ...]] = ("orders", ())


@contextmanager
def platform(
    root: Path,
    orders_instances: int = 2,
    extra: Sequence[tuple[str, tuple[str, ...]]] = (),
    database_urls: Mapping[str, str] | None = None,
) -> Iterator[tuple[ConsulAgent, dict[str, list[int]]]]:
    """The Consul agent and the platform's processes (and the `extra` services, with their
    flags: a gateway), with the pids of each service's; each service's state in a SQLite
    file under root, or in its database of `database_urls` (its DATABASE_URL)."""
    agent = ConsulAgent(log_path=root / "consul.log")
    agent.start()
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, list[int]] = {}
    pids: dict[str, list[int]] = {}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "FOODMESH_", "DATABASE_URL", "NATS_URL"))
    }
    env["CONSUL_HTTP_ADDR"] = agent.http_addr
    try:
        for n, (name, flags) in enumerate((*SERVICES, *[ORDERS] * orders_instances, *extra)):
            port = free_tcp_port()
            command = [sys.executable, "-m", f"services.{name}", "--port", str(port)]
            command += ["--data-dir", str(root / "data"), "--check-interval", "1", *flags]
            database = {}
            if database_urls is not None and name in database_urls:
                database["DATABASE_URL"] = database_urls[name]
            log_path = root / f"{name}-{n}.log"
            procs.append(spawn(command, env={**env, **database}, log_path=log_path, cwd=ROOT))
            ports.setdefault(name, []).append(port)
            pids.setdefault(name, []).append(procs[-1].pid)
        for name, expected in ports.items():
            wait_until(
                lambda name=name, expected=expected: (
                    len(agent.api(f"/v1/health/service/{name}?passing=1") or []) == len(expected)
                ),
                timeout=60,
                message=f"{name} not passing",
                ignore=(OSError,),
            )
        yield agent, pids
    finally:
        for proc in procs:
            stop_process(proc)
        agent.stop()


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU time (user + system) so far of each service's processes, and of this one."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {"bench": sum(os.times()[:2])}
    for name, ids in pids.items():
        total = 0.0
        for pid in ids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        used[name] = total
    return used


def commits(agent: ConsulAgent, service: str) -> float:
    """foodmesh_db_commits_total summed over the service's instances."""
    total = 0.0
    for entry in agent.api(f"/v1/health/service/{service}?passing=1") or []:
        port = entry["Service"]["Meta"]["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "foodmesh_db_commits_total":
                    total += sample.value
    return total


class Stubs:
    def __init__(self, channels: dict[str, Any], customer: str) -> None:
        self.users = users_pb2_grpc.UserServiceStub(channels["users"])
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(channels["catalog"])
        self.payments = payments_pb2_grpc.PaymentServiceStub(channels["payments"])
        self.delivery = delivery_pb2_grpc.DeliveryServiceStub(channels["delivery"])
        self.orders = orders_pb2_grpc.OrderServiceStub(channels["orders"])
        self.customer = customer

    async def checkout(self) -> None:
        order = await self.orders.PlaceOrder(
            orders_pb2.PlaceOrderRequest(
                customer_id=self.customer,
                lines=[orders_pb2.OrderLine(item_id=ITEM, quantity=1)],
                idempotency_key=uuid.uuid4().hex,
                payment_method="pm_card_visa",
                delivery_address="1 Bench Street",
            ),
            timeout=30,
        )
        if order.status != orders_pb2.ORDER_STATUS_CONFIRMED:
            raise RuntimeError(f"order {order.order_id} is {order.status}: {order}")

    async def direct(self) -> None:
        order_id = str(uuid.uuid4())
        await self.users.GetUser(users_pb2.GetUserRequest(user_id=self.customer), timeout=30)
        item = await self.catalog.GetItem(catalog_pb2.GetItemRequest(item_id=ITEM), timeout=30)
        payment = await self.payments.AuthorizePayment(
            payments_pb2.AuthorizePaymentRequest(
                order_id=order_id,
                customer_id=self.customer,
                amount_cents=item.price_cents,
                currency=item.currency,
                payment_method="pm_card_visa",
                idempotency_key=f"{order_id}/authorize",
            ),
            timeout=30,
        )
        await self.delivery.ScheduleDelivery(
            delivery_pb2.ScheduleDeliveryRequest(
                order_id=order_id,
                restaurant_id=item.restaurant_id,
                address="1 Bench Street",
                idempotency_key=f"{order_id}/schedule",
            ),
            timeout=30,
        )
        await self.payments.CapturePayment(
            payments_pb2.CapturePaymentRequest(
                payment_id=payment.payment_id, idempotency_key=f"{order_id}/capture"
            ),
            timeout=30,
        )


async def run_side(
    call: Callable[[], Awaitable[None]], concurrency: int, seconds: float
) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "per_s": len(ordered) / seconds,
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
    }


async def measure(
    agent: ConsulAgent, pids: dict[str, list[int]], options: argparse.Namespace
) -> dict[str, Any]:
    settings = ConsulSettings.parse(agent.http_addr)
    names = ("users", "catalog", "payments", "delivery", "orders")
    channels = {name: mesh.channel(name, consul=settings) for name in names}
    try:
        user = await users_pb2_grpc.UserServiceStub(channels["users"]).CreateUser(
            users_pb2.CreateUserRequest(
                email="bench@foodmesh.example", display_name="Bench", password="bench-password"
            ),
            timeout=30,
        )
        stubs = Stubs(channels, user.user_id)
        sides = {"checkout": stubs.checkout, "direct": stubs.direct}
        for call in sides.values():  # warm-up: connections, caches, first JIT-less paths
            await run_side(call, options.concurrency, 1.0)
        recorded: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, dict[str, float]] = {name: {} for name in sides}
        per_round: list[float] = []
        commits_before = {s: commits(agent, s) for s in ("orders", "payments", "delivery")}
        checkouts = 0
        for n in range(options.rounds):
            order = list(sides) if n % 2 == 0 else list(reversed(sides))
            p50s = {}
            for name in order:
                before = cpu_seconds(pids)
                latencies = await run_side(sides[name], options.concurrency, options.duration)
                for process, seconds in cpu_seconds(pids).items():
                    cpu[name][process] = cpu[name].get(process, 0.0) + seconds - before[process]
                recorded[name] += latencies
                p50s[name] = percentile(sorted(latencies), 0.5)
                if name == "checkout":
                    checkouts += len(latencies)
            per_round.append(p50s["checkout"] / p50s["direct"])
        seconds = options.duration * options.rounds
        results: dict[str, Any] = {n: summary(v, seconds) for n, v in recorded.items()}
        results["p50_ratio"] = results["checkout"]["p50_ms"] / results["direct"]["p50_ms"]
        results["p50_ratio_per_round"] = per_round
        results["cpu_ms_per_call"] = {
            side: {p: 1000 * s / len(recorded[side]) for p, s in used.items()}
            for side, used in cpu.items()
        }
        # direct calls write to payments and delivery too (two payments commits, one delivery
        # commit at least per loop): only orders' writes are the saga's own.
        results["orders_commits_per_checkout"] = (
            commits(agent, "orders") - commits_before["orders"]
        ) / checkouts
        results["customer_id"] = user.user_id
        return results
    finally:
        for channel in channels.values():
            await channel.close()


def meshctl_load(agent: ConsulAgent, customer: str, seconds: float) -> dict[str, Any]:
    body = json.dumps(
        {
            "customer_id": customer,
            "idempotency_key": "{{uuid}}",
            "lines": [{"item_id": ITEM, "quantity": 1}],
            "payment_method": "pm_card_visa",
            "delivery_address": "1 Bench Street",
        }
    )
    meshctl = shutil.which("meshctl", path=str(Path(sys.executable).parent)) or "meshctl"
    command = [meshctl, "load", "orders", "foodmesh.orders.v1.OrderService/PlaceOrder"]
    command += ["-d", body, "-c", "8", "-z", f"{seconds:g}s", "-O", "json"]
    answer = subprocess.run(
        command,
        env={**os.environ, "CONSUL_HTTP_ADDR": agent.http_addr},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    report: dict[str, Any] = json.loads(answer.stdout)
    return report


def render(results: dict[str, Any]) -> str:
    lines = [f"{'side':<10} {'calls':>7} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8}"]
    for name in ("checkout", "direct"):
        r = results[name]
        lines.append(
            f"{name:<10} {r['calls']:>7} {r['per_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        )
    for side, used in results["cpu_ms_per_call"].items():
        each = ", ".join(f"{p} {ms:.1f}" for p, ms in used.items())
        lines.append(f"CPU ms per {side}: {sum(used.values()):.1f} ({each})")
    rounds = ", ".join(f"{x:.3f}" for x in results["p50_ratio_per_round"])
    lines.append(
        f"checkout / direct at p50: {results['p50_ratio']:.3f} (goal <= 1.20; rounds: {rounds})"
    )
    lines.append(
        f"orders' database commits per checkout: {results['orders_commits_per_checkout']:.2f}"
    )
    load = results.get("meshctl_load")
    if load is not None:
        at = {row["percentile"]: row["latency_ms"] for row in load["latency_distribution"]}
        errors = sum(load["error_counts"].values())
        lines.append(
            f"meshctl load -c 8: {load['count']} calls, {load['rps']:.1f} calls/s, "
            f"p50 {at[50.0]:.1f} ms, p99 {at[99.0]:.1f} ms, {errors} errors "
            f"(status codes {load['status_counts']})"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per side per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--orders-instances",
        type=int,
        default=2,
        help="orders processes sharing one database (2, as the dev stack runs them)",
    )
    parser.add_argument("--no-load", action="store_true", help="skip the meshctl load run")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-checkout-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        with platform(root, options.orders_instances) as (agent, pids):
            results = asyncio.run(measure(agent, pids, options))
            if not options.no_load:
                results["meshctl_load"] = meshctl_load(
                    agent, results["customer_id"], options.duration * 2
                )
    print(json.dumps(results, indent=2) if options.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
