"""PlaceOrder on SQLite against Postgres, in one run: the same platform twice, one keeping
every service's state in SQLite files (the default), one in a Postgres database per service,
and `meshctl load` at -c 8 on each in turn.

    python -m scripts.bench_storage                       # 3 rounds x 10 s per engine
    python -m scripts.bench_storage --rounds 2 --duration 5 --json

How: a throwaway Postgres cluster (scripts/postgres_server.py, fsync on, as a production
server runs; SQLite's WAL is fsynced at each commit too), a database and a role per service,
and two platforms as the dev stack runs them (users, catalog, payments, delivery, two orders
instances; each with a Consul agent of its own), both running throughout. Rounds alternate
between the engines so that the machine's state drifts over both alike; each round is a
`meshctl load` subprocess on PlaceOrder with a fresh idempotency key per call. The idle
platform costs little (health checks, an idle outbox relay). Printed per engine: calls/s and
p50/p99 (the median of the rounds), errors; then Postgres / SQLite for throughput (the goal:
at least 0.8) and p50. Everything shares the machine's cores, so only the ratios mean
anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import mesh
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.discovery import ConsulSettings
from scripts.bench_checkout import meshctl_load, platform
from scripts.consul_agent import ConsulAgent
from scripts.postgres_server import PostgresServer

STATEFUL = ("users", "catalog", "payments", "delivery", "orders")
ENGINES = ("sqlite", "postgres")


async def customer(agent: ConsulAgent) -> str:
    """A user made through the platform's users service; its id."""
    async with mesh.channel("users", consul=ConsulSettings.parse(agent.http_addr)) as channel:
        user = await users_pb2_grpc.UserServiceStub(channel).CreateUser(
            users_pb2.CreateUserRequest(
                email="bench@foodmesh.example", display_name="Bench", password="bench-password"
            ),
            timeout=30,
        )
    return str(user.user_id)


def figures(load: dict[str, Any]) -> dict[str, float]:
    at = {row["percentile"]: row["latency_ms"] for row in load["latency_distribution"]}
    return {
        "per_s": float(load["rps"]),
        "p50_ms": float(at[50.0]),
        "p99_ms": float(at[99.0]),
        "errors": float(sum(load["error_counts"].values())),
    }


def run(options: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        postgres = stack.enter_context(PostgresServer(durable=True))
        urls = {name: postgres.service_database(name) for name in STATEFUL}
        agents: dict[str, ConsulAgent] = {}
        for engine in ENGINES:
            (root / engine / "data").mkdir(parents=True)
            agent, _ = stack.enter_context(
                platform(root / engine, database_urls=urls if engine == "postgres" else None)
            )
            agents[engine] = agent
        customers = {engine: asyncio.run(customer(agents[engine])) for engine in ENGINES}
        for engine in ENGINES:  # warm-up: connections, caches, the first sagas
            meshctl_load(agents[engine], customers[engine], 2)
        rounds: dict[str, list[dict[str, float]]] = {engine: [] for engine in ENGINES}
        for n in range(options.rounds):
            order = ENGINES if n % 2 == 0 else ENGINES[::-1]
            for engine in order:
                load = meshctl_load(agents[engine], customers[engine], options.duration)
                rounds[engine].append(figures(load))
    results: dict[str, Any] = {"rounds": rounds}
    for engine in ENGINES:
        results[engine] = {
            key: statistics.median(r[key] for r in rounds[engine])
            for key in ("per_s", "p50_ms", "p99_ms")
        } | {"errors": sum(r["errors"] for r in rounds[engine])}
    results["throughput_ratio"] = results["postgres"]["per_s"] / results["sqlite"]["per_s"]
    results["p50_ratio"] = results["postgres"]["p50_ms"] / results["sqlite"]["p50_ms"]
    results["throughput_ratio_per_round"] = [
        p["per_s"] / s["per_s"] for s, p in zip(rounds["sqlite"], rounds["postgres"], strict=True)
    ]
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"{'engine':<9} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for engine in ENGINES:
        r = results[engine]
        lines.append(
            f"{engine:<9} {r['per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
            f" {r['errors']:>7.0f}"
        )
    per_round = ", ".join(f"{x:.3f}" for x in results["throughput_ratio_per_round"])
    lines.append(
        f"postgres / sqlite: throughput {results['throughput_ratio']:.3f} (goal >= 0.8;"
        f" rounds: {per_round}), p50 {results['p50_ratio']:.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    results = run(options)
    print(json.dumps(results, indent=2) if options.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
