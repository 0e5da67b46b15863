"""What `meshctl load` costs as a load generator, against a minimal hand-written grpc.aio loop.

    python scripts/bench_load.py                          # 5 rounds x 3 s, concurrency 32
    python scripts/bench_load.py --duration 2 --rounds 4 --json
    python scripts/bench_load.py --server node            # a cheap Node.js server (below)

Why: a load tester that spends more per call than the service measures itself. The physical
limit of one Python process is the leanest possible grpc.aio loop: N tasks, each awaiting a
raw-bytes unary call in turn, nothing else (scripts/bench_overhead.py's `measure`). The goal
is that `meshctl load` with one worker reaches at least 0.95 of that loop's throughput
against the same server, and that two worker processes do better than one where the server
is not the bottleneck.

How: one server runs in a child process, a grpc.aio server whose
foodmesh.catalog.v1.CatalogService/GetItem returns its request bytes (a GetItemRequest's
bytes are a valid Item, so the answer is a real response; the handler costs nothing), with
server reflection, as `meshctl load` needs. Four sides call GetItem with the same 64-byte
request, at the same concurrency, for `--duration` each, in alternating rounds (each side in
each position), after a warm-up:

    loop    bench_overhead.measure on a bare grpc.aio channel, calls without a deadline
    loop+t  the same loop, each call with the deadline meshctl load gives it (-t, 20 s by
            default, as ghz): the baseline of the goal. A deadline costs grpc.aio about 4 us
            a call (a timer in gRPC's core), which any caller with deadlines pays; the goal
            is about what the load tester adds, so it compares calls alike. load/1 / loop
            is printed too.
    load/1  `meshctl load`'s engine in this process, as the command runs it with --workers 1:
            the method found by reflection, the request from a JSON template, every call
            recorded in the HDR histogram (meshctl/load/runner.py, CallLoop)
    load/2  --workers 2: two worker processes (meshctl/load/workers.py, WorkerPool), started
            and prepared before each round (not timed), their records merged

Reading the output: calls/s, p50 and p99 of each side, client CPU per call (this process for
loop and load/1, the two workers for load/2) and the server's CPU per call and busy share of
one core (over 100%: gRPC's C threads work beside the Python one). The machine's cores are
shared by client and server, so only ratios within one run mean anything; the per-round
ratios show how noisy the run was (their median resists the odd round disturbed by something
else on the machine). "machine bound" is what the cores allow at the CPU per call measured,
cores / (client + server CPU per call), and the share of it reached: a side near its bound is
limited by the machine, not by the generator, and then more workers cannot help. On a machine
with cores to spare for the workers (or with the server elsewhere), load/2 / load/1 shows
what they add; "generator capacity" estimates that case from the client CPU per call, K
workers / CPU per call, as if each worker process had a core of its own. Exit code 0 whether
the goal is met or not; 1 when a call failed.

`--server node`: why a second server. The Python server costs more CPU per call than the
generator (about 250 us against 160 us on a 2-core machine), so with one worker client and
server already fill two cores, and load/2 / load/1 shows the machine, not what a second worker
adds. The fix is a server whose cost per call is small next to the generator's, which leaves
cores to the workers: `--server node` runs the same methods (GetItem and /bench.Echo/Call as
raw-bytes echoes, server reflection v1 and v1alpha serving catalog.proto) in Node.js with
@grpc/grpc-js, scripts/bench_echo_server/server.js, measured the same way (its process's CPU
time). It needs node and npm on PATH; the first run installs the packages pinned in its
package-lock.json with `npm ci` (node_modules is not committed). Node.js is for this benchmark
only, never a dependency of the project or its tests. grpc-js is about four times cheaper per
call than grpc.aio, but not free: on a 2-core machine it still costs nearly what the generator
does at that rate, so the machine bound column stays the first thing to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

_PROJECT = str(Path(__file__).resolve().parent.parent)
# Run as a script, only scripts/ is on sys.path; the project is not.
if _PROJECT not in sys.path:
    sys.path.insert(0, _PROJECT)

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from foodmesh.catalog.v1 import catalog_pb2  # noqa: E402, F401  (reflection serves its file)
from mesh.core import keepalive  # noqa: E402
from mesh.server.reflection import enable_reflection  # noqa: E402
from meshctl.load.runner import DEFAULT_TIMEOUT, CallLoop, LoadPlan, invoker  # noqa: E402
from meshctl.load.stats import RecordedRun, decode_histogram, merge  # noqa: E402
from meshctl.load.target import CallSpec, Prepared, Target, prepare  # noqa: E402
from meshctl.load.workers import WorkerPool  # noqa: E402
from scripts.bench_harness import (  # noqa: E402
    Sample,
    ServerProcess,
    echo,
    measure,
    percentile,
    process_cpu,
    serve_until_signalled,
)

SERVICE = "foodmesh.catalog.v1.CatalogService"
METHOD = f"{SERVICE}/GetItem"
THROUGHPUT_GOAL = 0.95
"""load/1 calls per second must be at least this share of the hand-written loop's."""
SIDES = ("loop", "loop+t", "load/1", "load/2")
RATIOS = {
    "load/1 / loop+t": ("load/1", "loop+t"),
    "load/1 / loop": ("load/1", "loop"),
    "load/2 / load/1": ("load/2", "load/1"),
}
"""Ratio name: (numerator side, denominator side)."""
GOAL_RATIO = "load/1 / loop+t"
"""The goal compares calls alike: each with the deadline meshctl load gives it (see doc)."""
CORES = os.cpu_count() or 1
SERVERS = {"python": "Python grpc.aio", "node": "Node.js grpc-js"}
"""--server choices, and how the output names them."""
NODE_SERVER = Path(__file__).resolve().parent / "bench_echo_server"


# -- the server (child process) -------------------------------------------------------------


async def serve(port: int) -> None:
    """GetItem as an echo, with reflection, on HOST:port until SIGTERM or SIGINT. It also
    serves the harness's echo, which ServerProcess.wait_ready calls."""
    server = aio.server(options=keepalive.server_options())
    echo_call = {"Call": grpc.unary_unary_rpc_method_handler(echo)}
    get_item = {"GetItem": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_registered_method_handlers("bench.Echo", echo_call)  # type: ignore[attr-defined]
    server.add_registered_method_handlers(SERVICE, get_item)  # type: ignore[attr-defined]
    enable_reflection([SERVICE], server)
    await serve_until_signalled(server, port)


def node_server_command(port: int) -> list[str]:
    """The command that runs bench_echo_server/server.js on `port`, after installing its
    packages (`npm ci`, from the committed package-lock.json) if they are not there yet.
    SystemExit with the reason when node or npm is missing or the install fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        raise SystemExit(
            f"--server node needs Node.js (node and npm on PATH, Node 18 or later); "
            f"{missing} not found"
        )
    # npm writes node_modules/.package-lock.json last: its absence means no complete install.
    if not (NODE_SERVER / "node_modules" / ".package-lock.json").exists():
        print(f"bench_load: npm ci in {NODE_SERVER} (once)", file=sys.stderr)
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_SERVER,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"--server node: npm ci in {NODE_SERVER} failed ({done.returncode})")
    return [node, str(NODE_SERVER / "server.js"), str(port)]


def server_command(kind: str, port: int) -> list[str]:
    """The bench server on `port`: `serve` above, or with kind "node" the same methods in
    Node.js (bench_echo_server/server.js)."""
    if kind == "node":
        return node_server_command(port)
    return [sys.executable, str(Path(__file__).resolve()), "--serve", str(port)]


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Side:
    """One side's rounds, pooled."""

    calls: int = 0
    errors: int = 0
    elapsed: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    runs: list[RecordedRun] = field(default_factory=list)
    """The load tester's records (latencies for the percentiles)."""
    latencies: list[float] = field(default_factory=list)
    """The hand-written loop's latencies."""

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed if self.elapsed else 0.0

    def add(self, calls: int, errors: int, elapsed: float, client: float, server: float) -> float:
        self.calls += calls
        self.errors += errors
        self.elapsed += elapsed
        self.client_cpu += client
        self.server_cpu += server
        return calls / elapsed if elapsed else 0.0

    def percentiles(self) -> tuple[float, float]:
        """(p50, p99) in seconds: nearest rank of the loop's latencies, or the merged HDR
        histogram of the load tester's runs."""
        if self.latencies:
            ordered = sorted(self.latencies)
            return percentile(ordered, 0.50), percentile(ordered, 0.99)
        histogram = decode_histogram(merge(self.runs).histogram)
        p50, p99 = (histogram.get_value_at_percentile(q) / 1e6 for q in (50, 99))
        return float(p50), float(p99)


@dataclass(frozen=True)
class Options:
    duration: float = 3.0
    rounds: int = 5
    concurrency: int = 32
    warmup: float = 1.0
    server: str = "python"


def _cpu(pids: Sequence[int]) -> float:
    return sum(process_cpu(pid) or 0.0 for pid in pids)


async def _loop_round(
    side: Side, call: Any, payload: bytes, options: Options, server: int
) -> float:
    before = process_cpu(server) or 0.0
    sample: Sample = await measure(call, payload, options.concurrency, options.duration)
    side.latencies.extend(sample.latencies)
    return side.add(
        sample.calls,
        sample.errors,
        sample.elapsed,
        sample.cpu,
        (process_cpu(server) or 0.0) - before,
    )


async def _load1_round(side: Side, prepared: Prepared, options: Options, server: int) -> float:
    plan = LoadPlan(concurrency=options.concurrency, duration=options.duration)
    invoke = invoker(prepared.connection.channel, prepared.method, plan.timeout, None)
    calls = CallLoop(invoke, prepared.template, plan.shares()[0])
    before, cpu = process_cpu(server) or 0.0, time.process_time()
    recorder, result = await calls.run()
    cpu = time.process_time() - cpu
    run = recorder.snapshot()
    side.runs.append(run)
    errors = recorder.errors
    return side.add(
        recorder.count, errors, result.elapsed, cpu, (process_cpu(server) or 0.0) - before
    )


async def _load2_round(side: Side, spec: CallSpec, options: Options, server: int) -> float:
    plan = LoadPlan(concurrency=options.concurrency, duration=options.duration, workers=2)
    pool = WorkerPool(spec, plan.shares())
    try:
        await pool.start(timeout=60.0)
        before, workers = process_cpu(server) or 0.0, _cpu(pool.pids)
        outcome = await pool.run()
        workers = _cpu(pool.pids) - workers
        server_cpu = (process_cpu(server) or 0.0) - before
    finally:
        await pool.close()
    side.runs.append(outcome.run)
    counts = outcome.run.status_counts
    calls = sum(counts.values())
    return side.add(calls, calls - counts.get("OK", 0), outcome.phase.elapsed, workers, server_cpu)


async def run(options: Options, server: ServerProcess) -> dict[str, Any]:
    spec = CallSpec(Target(server.address), METHOD, json.dumps({"item_id": "x" * 62}))
    prepared = await prepare(spec)
    payload = prepared.template.render(0)[0]
    assert len(payload) == 64
    bare = aio.insecure_channel(server.address, options=keepalive.client_options())
    try:
        call = bare.unary_unary("/" + METHOD, _registered_method=True)  # type: ignore[call-arg]
        if await call(payload) != payload:
            raise RuntimeError("the server did not echo")
        warm = Options(options.warmup, 1, options.concurrency)
        await measure(call, payload, options.concurrency, options.warmup)
        await _load1_round(Side(), prepared, warm, server.pid)
        sides = {name: Side() for name in SIDES}
        timed = partial(call, timeout=DEFAULT_TIMEOUT)  # the deadline load/1 gives each call
        ratios: dict[str, list[float]] = {name: [] for name in RATIOS}
        for index in range(options.rounds):
            shift = index % len(SIDES)
            rates = {}
            for name in SIDES[shift:] + SIDES[:shift]:
                if name in ("loop", "loop+t"):
                    loop_call = call if name == "loop" else timed
                    rates[name] = await _loop_round(
                        sides[name], loop_call, payload, options, server.pid
                    )
                elif name == "load/1":
                    rates[name] = await _load1_round(sides[name], prepared, options, server.pid)
                else:
                    rates[name] = await _load2_round(sides[name], spec, options, server.pid)
            for name, (numerator, denominator) in RATIOS.items():
                ratios[name].append(rates[numerator] / rates[denominator])
    finally:
        await bare.close(None)
        await prepared.close()
    return _results(options, sides, ratios)


def _results(
    options: Options, sides: dict[str, Side], rounds: dict[str, list[float]]
) -> dict[str, Any]:
    table = {}
    for name, side in sides.items():
        p50, p99 = side.percentiles()
        per_call = 1e6 / side.calls if side.calls else 0.0
        table[name] = {
            "calls": side.calls,
            "errors": side.errors,
            "calls_per_s": side.rate,
            "p50_ms": p50 * 1e3,
            "p99_ms": p99 * 1e3,
            "client_cpu_us_per_call": side.client_cpu * per_call,
            "server_cpu_us_per_call": side.server_cpu * per_call,
            "server_busy": side.server_cpu / side.elapsed if side.elapsed else 0.0,
        }
        cpu_per_call = (side.client_cpu + side.server_cpu) / side.calls if side.calls else 0.0
        table[name]["machine_bound_per_s"] = CORES / cpu_per_call if cpu_per_call else 0.0
    ratios = {
        name: table[numerator]["calls_per_s"] / table[denominator]["calls_per_s"]
        for name, (numerator, denominator) in RATIOS.items()
    }
    load1 = ratios[GOAL_RATIO]
    return {
        "options": asdict(options),
        "sides": table,
        "ratios": ratios,
        "round_ratios": rounds,
        "generator_capacity_per_s": {
            name: workers * 1e6 / table[name]["client_cpu_us_per_call"]
            for name, workers in (("load/1", 1), ("load/2", 2))
            if table[name]["client_cpu_us_per_call"]
        },
        "goal": {f"{GOAL_RATIO} >= ": THROUGHPUT_GOAL, "met": load1 >= THROUGHPUT_GOAL},
    }


def render(results: dict[str, Any]) -> str:
    o = results["options"]
    lines = [
        f"meshctl load against a hand-written grpc.aio loop: {o['rounds']} alternating rounds x "
        f"{o['duration']:g} s per side, concurrency {o['concurrency']}, /{METHOD} (64 B echo, "
        f"{SERVERS[o['server']]} server)",
        "",
        f"  {'':8}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'client CPU':>12}{'server CPU':>12}"
        f"{'server busy':>13}{'machine bound':>15}{'errors':>8}",
    ]
    for name, s in results["sides"].items():
        lines.append(
            f"  {name:8}{s['calls_per_s']:>10.0f}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}"
            f"{s['client_cpu_us_per_call']:>9.0f} us{s['server_cpu_us_per_call']:>9.0f} us"
            f"{s['server_busy']:>12.0%}{s['machine_bound_per_s']:>9.0f} "
            f"{s['calls_per_s'] / s['machine_bound_per_s']:>4.0%}{s['errors']:>8}"
        )
    lines.append("")
    for name, ratio in results["ratios"].items():
        rounds = results["round_ratios"][name]
        per_round = " ".join(f"{x:.3f}" for x in rounds)
        lines.append(
            f"  {name:16} {ratio:.3f}   median of rounds {statistics.median(rounds):.3f}, "
            f"per round: {per_round}"
        )
    lines.append(
        f"  machine bound: {CORES} cores / (client + server CPU per call); a side near it "
        "is limited by the machine, not by the generator"
    )
    capacity = results["generator_capacity_per_s"]
    lines.append(
        "  generator capacity, a core per worker at the CPU per call measured (an estimate, "
        f"not a measurement): load/1 {capacity['load/1']:.0f}/s, load/2 "
        f"{capacity['load/2']:.0f}/s (x{capacity['load/2'] / capacity['load/1']:.2f})"
    )
    load1 = results["ratios"][GOAL_RATIO]
    lines.append(
        f"  goal: {GOAL_RATIO} {load1:.3f} >= {THROUGHPUT_GOAL} "
        f"{'ok' if results['goal']['met'] else 'MISSED'}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="meshctl load's own cost (see module doc).")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round per side")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per side, unmeasured")
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="python",
        help="the echo server: grpc.aio (default) or a cheap Node.js one (see module doc)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.concurrency < 2 or args.warmup <= 0:
        parser.error("--duration and --warmup must be > 0, --rounds >= 1, --concurrency >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return 0
    options = Options(args.duration, args.rounds, args.concurrency, args.warmup, args.server)
    server = ServerProcess(partial(server_command, args.server))
    try:

        async def bench() -> dict[str, Any]:
            await server.wait_ready()
            return await run(options, server)

        results = asyncio.run(bench())
    finally:
        server.stop()
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 1 if any(side["errors"] for side in results["sides"].values()) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
