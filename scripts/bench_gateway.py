"""What the gateway hop costs: calls through the gateway against the same calls straight to
the service, in one run, alternating, with the gateway's authentication and rate limiting on.

    python -m scripts.bench_gateway                       # 4 rounds x 3 s per side
    python -m scripts.bench_gateway --rounds 2 --duration 2 --json

How: a Consul dev agent and the platform's processes on free ports in a temporary directory,
and one gateway whose rate limit is far above what the benchmark reaches (so the limiter
decides every call and refuses none). The client is what an app outside the mesh runs: a
plain grpc.aio channel and generated stubs, to the gateway's address on one side and to the
service instance's on the other:

    GetItem     public: no token (the limiter still decides it)
    PlaceOrder  with a token from Login through the gateway (verified on every call);
                straight to orders with the customer_id in the body; a fresh key each call

at concurrency 1 and 32. For GetItem a third side calls through `bare`: the least a Python
proxy can be, a grpc.aio server in a process of its own whose one generic handler forwards the
bytes on a plain grpc.aio channel to the same catalog instance (no interceptors, no mesh, no
auth): what any hop written on grpc.aio costs on this machine, the floor under the gateway's
figure. It prints each side's calls/s and p50/p90, the throughput ratio
(gateway / direct) and what the hop adds at p50, and the gateway's CPU per call. Goal: at most
+0.3 ms at p50 at c=1 (Istio publishes +0.23 ms p90 for its sidecar pair at 1000 rps). It also
counts, from the gateway's own metrics, the messages it decoded while forwarding N gRPC calls:
0, since the router has no deserializer (then a few HTTP/JSON calls show the counter moves).
Client, gateway and services share the machine's two cores: only ratios within one run mean
anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from scripts.bench_checkout import ITEM, cpu_seconds, platform, run_side, summary
from scripts.bench_harness import PROJECT_ROOT, percentile, serve_until_signalled
from scripts.consul_agent import ConsulAgent
from scripts.processes import free_tcp_port, spawn, stop_process

GATEWAY = ("gateway", ("--rate-limit", "1000000/s", "--rate-burst", "1000000"))


async def bare_proxy(target: str, port: int) -> None:
    """Serve every method on 127.0.0.1:`port` by forwarding its bytes, unary, to `target`:
    the floor a grpc.aio hop costs (run as `python -m scripts.bench_gateway --bare-proxy`)."""
    channel = grpc.aio.insecure_channel(target)
    handlers: dict[str, Any] = {}

    def handler_for(method: str) -> Any:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)

        async def forward(request: bytes, context: Any) -> bytes:
            answer: bytes = await call(request)
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)

    class Forward(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            found = handlers.get(details.method)
            if found is None:
                found = handlers[details.method] = handler_for(details.method)
            return found

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Forward(),))
    await serve_until_signalled(server, port)


PASSWORD = "bench-password"


def address(agent: ConsulAgent, service: str) -> str:
    entry = (agent.api(f"/v1/health/service/{service}?passing=1") or [])[0]["Service"]
    return f"{entry['Address']}:{entry['Port']}"


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return bytes(answer.read())


def gateway_metrics(agent: ConsulAgent) -> dict[str, float]:
    """The gateway's counters that tell what it forwarded and what it decoded."""
    entry = (agent.api("/v1/health/service/gateway?passing=1") or [])[0]["Service"]
    url = f"http://127.0.0.1:{entry['Meta']['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    found = {"forwarded": 0.0, "decoded": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total" and sample.labels.get(
                "grpc_service", ""
            ).startswith("foodmesh."):
                found["forwarded"] += sample.value
            if sample.name == "foodmesh_gateway_messages_decoded_total":
                found["decoded"] += sample.value
    return found


async def measure(
    agent: ConsulAgent, pids: dict[str, list[int]], options: argparse.Namespace
) -> dict[str, Any]:
    edge = grpc.aio.insecure_channel(address(agent, "gateway"))
    bare = grpc.aio.insecure_channel(f"127.0.0.1:{options.bare_port}")
    catalog_direct = grpc.aio.insecure_channel(address(agent, "catalog"))
    orders_direct = grpc.aio.insecure_channel(address(agent, "orders"))
    try:
        users = users_pb2_grpc.UserServiceStub(edge)
        user = await users.CreateUser(
            users_pb2.CreateUserRequest(
                email="bench@gateway.example", display_name="Bench", password=PASSWORD
            ),
            timeout=30,
        )
        login = await users.Login(
            users_pb2.LoginRequest(email="bench@gateway.example", password=PASSWORD), timeout=30
        )
        token = (("authorization", f"Bearer {login.access_token}"),)
        get_item = catalog_pb2.GetItemRequest(item_id=ITEM)

        def order(customer: str) -> orders_pb2.PlaceOrderRequest:
            return orders_pb2.PlaceOrderRequest(
                customer_id=customer,
                lines=[orders_pb2.OrderLine(item_id=ITEM, quantity=1)],
                idempotency_key=uuid.uuid4().hex,
                payment_method="pm_card_visa",
                delivery_address="1 Bench Street",
            )

        via_catalog = catalog_pb2_grpc.CatalogServiceStub(edge)
        via_bare = catalog_pb2_grpc.CatalogServiceStub(bare)
        await via_bare.GetItem(get_item, timeout=30, wait_for_ready=True)
        to_catalog = catalog_pb2_grpc.CatalogServiceStub(catalog_direct)
        via_orders = orders_pb2_grpc.OrderServiceStub(edge)
        to_orders = orders_pb2_grpc.OrderServiceStub(orders_direct)
        cases: dict[str, dict[str, Callable[[], Awaitable[Any]]]] = {
            "GetItem": {
                "direct": lambda: to_catalog.GetItem(get_item, timeout=30),
                "gateway": lambda: via_catalog.GetItem(get_item, timeout=30),
                "bare": lambda: via_bare.GetItem(get_item, timeout=30),
            },
            "PlaceOrder": {
                "direct": lambda: to_orders.PlaceOrder(order(user.user_id), timeout=30),
                "gateway": lambda: via_orders.PlaceOrder(order(""), metadata=token, timeout=30),
            },
        }
        before = gateway_metrics(agent)
        results: dict[str, Any] = {}
        for method, sides in cases.items():
            for concurrency in options.concurrency:
                for call in sides.values():  # warm-up
                    await run_side(call, concurrency, 0.5)
                recorded: dict[str, list[float]] = {side: [] for side in sides}
                gateway_cpu = 0.0
                for n in range(options.rounds):
                    for side in list(sides) if n % 2 == 0 else list(reversed(sides)):
                        cpu_before = cpu_seconds(pids)
                        recorded[side] += await run_side(sides[side], concurrency, options.duration)
                        if side == "gateway":
                            gateway_cpu += cpu_seconds(pids)["gateway"] - cpu_before["gateway"]
                seconds = options.duration * options.rounds
                row: dict[str, Any] = {s: summary(v, seconds) for s, v in recorded.items()}
                for side, latencies in recorded.items():
                    row[side]["p90_ms"] = percentile(sorted(latencies), 0.90) * 1000
                row["throughput_ratio"] = row["gateway"]["per_s"] / row["direct"]["per_s"]
                row["added_p50_ms"] = row["gateway"]["p50_ms"] - row["direct"]["p50_ms"]
                if "bare" in row:
                    row["bare_added_p50_ms"] = row["bare"]["p50_ms"] - row["direct"]["p50_ms"]
                    row["bare_throughput_ratio"] = row["bare"]["per_s"] / row["direct"]["per_s"]
                row["gateway_cpu_ms_per_call"] = (
                    1000 * gateway_cpu / max(1, len(recorded["gateway"]))
                )
                results[f"{method} c={concurrency}"] = row
        after = gateway_metrics(agent)
        results["forwarded_grpc_calls"] = after["forwarded"] - before["forwarded"]
        results["decoded_on_grpc_path"] = after["decoded"] - before["decoded"]
        http_port = options.http_port
        url = f"http://127.0.0.1:{http_port}/v1/items/{ITEM}"
        for _ in range(3):  # the control: HTTP/JSON decodes (request in, response out)
            await asyncio.to_thread(http_get, url)
        results["decoded_by_3_http_calls"] = gateway_metrics(agent)["decoded"] - after["decoded"]
        return results
    finally:
        for channel in (edge, bare, catalog_direct, orders_direct):
            await channel.close(None)


def render(results: dict[str, Any]) -> str:
    lines = [f"{'case':<16} {'side':<8} {'calls/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"]
    for case, row in results.items():
        if not isinstance(row, dict):
            continue
        for side in ("direct", "bare", "gateway"):
            if side not in row:
                continue
            r = row[side]
            lines.append(
                f"{case:<16} {side:<8} {r['per_s']:>8.1f} {r['p50_ms']:>8.3f} "
                f"{r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f}"
            )
        lines.append(
            f"{'':<16} gateway/direct throughput {row['throughput_ratio']:.3f}, "
            f"added p50 {row['added_p50_ms']:+.3f} ms, "
            f"gateway CPU {row['gateway_cpu_ms_per_call']:.3f} ms/call"
        )
        if "bare" in row:
            lines.append(
                f"{'':<16} bare/direct throughput {row['bare_throughput_ratio']:.3f}, "
                f"added p50 {row['bare_added_p50_ms']:+.3f} ms (the floor of any grpc.aio hop)"
            )
    lines.append(
        f"messages decoded by the gateway while forwarding {results['forwarded_grpc_calls']:.0f} "
        f"gRPC calls: {results['decoded_on_grpc_path']:.0f} "
        f"(3 HTTP/JSON calls decoded {results['decoded_by_3_http_calls']:.0f})"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per side per round")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="(default: 1 32)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--bare-proxy", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.bare_proxy:  # the child process of the `bare` side
        asyncio.run(bare_proxy(options.bare_proxy, options.port))
        return 0
    options.http_port = free_tcp_port()
    gateway = (GATEWAY[0], (*GATEWAY[1], "--http-port", str(options.http_port)))
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        with platform(root, 1, extra=(gateway,)) as (agent, pids):
            options.bare_port = free_tcp_port()
            command = [sys.executable, "-m", "scripts.bench_gateway"]
            command += ["--bare-proxy", address(agent, "catalog"), "--port", str(options.bare_port)]
            proxy = spawn(command, log_path=root / "bare-proxy.log", cwd=PROJECT_ROOT)
            try:
                results = asyncio.run(measure(agent, pids, options))
            finally:
                stop_process(proxy)
    print(json.dumps(results, indent=2) if options.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
