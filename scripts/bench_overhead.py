"""What a mesh channel costs per call, against bare grpc.aio to the same server.

    python scripts/bench_overhead.py                      # 5 rounds x 3 s, concurrency 1 and 32
    python scripts/bench_overhead.py --duration 2 --rounds 4 --json
    python scripts/bench_overhead.py --only mesh --concurrency 32   # one side, for a profiler

Why: the mesh exists because a sidecar's two proxy hops cost too much per call, so its own cost
per call must stay far below theirs (../shared/design.md). That cost is the Python work the
call path adds on top of grpc.aio (deadline, breaker, bulkhead, retry state and budget, P2C
over peak-EWMA, outlier ejection, load and latency bookkeeping), so the baseline is the same
call on a bare `grpc.aio.insecure_channel` in the same process, against the same server.

How: one echo server runs in a child process (a grpc.aio server with one unary-unary method,
/bench.Echo/Call, that returns its request bytes), so client and server do not share an event
loop. The client process opens a bare channel and a `mesh.channel("echo")` over a
StaticResolver with the default ServicePolicy (every resilience layer on; there is no tracing).
Both send raw bytes, no serializers, on a registered method, with the same channel options, so
only the call path differs. For each concurrency N, N tasks each make sequential calls for
`--duration` seconds; after a warm-up of each side, rounds alternate bare and mesh (and which
goes first), so that drift (CPU frequency, the other process, GC) hits both sides alike.

Reading the output: the machine's cores are shared by client and server, so absolute numbers
mean little and change between runs; compare the two sides of one run only. Per concurrency:
calls/s and p50/p99 latency of each side (latencies pooled over all rounds), then mesh/bare
ratios. The goal is a throughput ratio >= 0.95 and a p50 ratio <= 1.05. At concurrency 1 the
p50 difference is the latency the mesh adds to one call; at 32 the machine is CPU-bound, and
"1/throughput", 1/throughput(mesh) - 1/throughput(bare), is the time the mesh adds per call
to the whole machine. "CPU us/call" is the client process's CPU time (all its threads) per
call: the least noisy measure of what the mesh costs, since it does not depend on how the two
processes were scheduled; its mesh/bare ratio is in the last column. The per-round throughput
ratios show how noisy the run was: a goal missed by less than their spread is noise, not a
verdict. The exit code is 0 whether the goal is met
or not (1 when a call failed or the server did not start); --json prints the same numbers for
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, only scripts/ is on sys.path; the project is not.
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

import mesh  # noqa: E402
from discovery import StaticResolver  # noqa: E402
from mesh import keepalive  # noqa: E402
from mesh.policy import ServicePolicy  # noqa: E402
from scripts.processes import free_tcp_port, spawn, stop_process  # noqa: E402

HOST = "127.0.0.1"
SERVICE = "echo"
METHOD = "/bench.Echo/Call"
THROUGHPUT_GOAL = 0.95
"""mesh/bare calls per second must be at least this."""
P50_GOAL = 1.05
"""mesh/bare median latency must be at most this."""

Call = Callable[[bytes], Awaitable[bytes]]


def _method(channel: aio.Channel) -> aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """METHOD on `channel`: raw bytes both ways, registered as generated stubs do."""
    return channel.unary_unary(METHOD, _registered_method=True)  # type: ignore[call-arg]


# -- the server (child process) -------------------------------------------------------------


async def _echo(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def serve(port: int) -> None:
    """Serve /bench.Echo/Call on HOST:port until SIGTERM or SIGINT."""
    server = aio.server(options=keepalive.server_options())
    handlers = {"Call": grpc.unary_unary_rpc_method_handler(_echo)}
    server.add_registered_method_handlers("bench.Echo", handlers)  # type: ignore[attr-defined]
    if server.add_insecure_port(f"{HOST}:{port}") != port:
        raise SystemExit(f"echo server: cannot bind {HOST}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


class EchoServer:
    """The echo server in a child process (its own process group, dying with us)."""

    def __init__(self) -> None:
        self.port = free_tcp_port(HOST)
        self.address = f"{HOST}:{self.port}"
        self._proc = spawn(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)]
        )

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until one echo call succeeds (fails early if the child exits)."""
        deadline = time.monotonic() + timeout
        async with aio.insecure_channel(self.address) as channel:
            call = _method(channel)
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"echo server exited with {self._proc.returncode}")
                try:
                    if await call(b"ping", timeout=1.0, wait_for_ready=True) == b"ping":
                        return
                except aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"echo server on {self.address} did not answer")

    def stop(self) -> None:
        stop_process(self._proc, timeout=5.0)


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Sample:
    """One side's calls over one or more rounds."""

    calls: int = 0
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    """Client process CPU seconds (every thread: ours and gRPC's)."""
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.elapsed += other.elapsed
        self.cpu += other.cpu
        self.latencies.extend(other.latencies)

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed if self.elapsed else 0.0


async def _worker(call: Call, payload: bytes, stop_at: float, sample: Sample) -> None:
    clock = time.perf_counter
    record = sample.latencies.append
    while clock() < stop_at:
        started = clock()
        try:
            await call(payload)
        except aio.AioRpcError:
            sample.errors += 1
            continue
        record(clock() - started)


async def measure(call: Call, payload: bytes, concurrency: int, duration: float) -> Sample:
    """`concurrency` tasks each calling `call` in sequence for `duration` seconds."""
    sample = Sample()
    cpu_started = time.process_time()
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(*(_worker(call, payload, stop_at, sample) for _ in range(concurrency)))
    sample.elapsed = time.perf_counter() - started
    sample.cpu = time.process_time() - cpu_started
    sample.calls = len(sample.latencies)
    return sample


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile (0 < q <= 1) of sorted values; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = math.ceil(q * len(ordered) - 1e-9)
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def summary(sample: Sample) -> dict[str, float]:
    ordered = sorted(sample.latencies)
    return {
        "calls": sample.calls,
        "errors": sample.errors,
        "calls_per_s": sample.rate,
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "client_cpu_us_per_call": sample.cpu / sample.calls * 1e6 if sample.calls else 0.0,
    }


@dataclass
class Result:
    """Both sides at one concurrency, with the ratios and the goal check."""

    concurrency: int
    bare: dict[str, float]
    mesh: dict[str, float]
    ratios: dict[str, float]
    round_throughput_ratios: list[float]
    extra_time_per_call_us: float
    goal_met: bool


def compare(concurrency: int, bare: Sample, mesh_: Sample, rounds: list[float]) -> Result:
    b, m = summary(bare), summary(mesh_)
    ratios = {
        "throughput": m["calls_per_s"] / b["calls_per_s"] if b["calls_per_s"] else 0.0,
        "p50": m["p50_ms"] / b["p50_ms"] if b["p50_ms"] else 0.0,
        "p99": m["p99_ms"] / b["p99_ms"] if b["p99_ms"] else 0.0,
        "client_cpu": m["client_cpu_us_per_call"] / b["client_cpu_us_per_call"]
        if b["client_cpu_us_per_call"]
        else 0.0,
    }
    extra = (1 / m["calls_per_s"] - 1 / b["calls_per_s"]) * 1e6 if m["calls"] and b["calls"] else 0
    met = ratios["throughput"] >= THROUGHPUT_GOAL and ratios["p50"] <= P50_GOAL
    return Result(
        concurrency, b, m, ratios, rounds, extra, met and not (b["errors"] or m["errors"])
    )


@dataclass(frozen=True)
class Options:
    duration: float = 3.0
    rounds: int = 5
    concurrency: tuple[int, ...] = (1, 32)
    payload: int = 64
    warmup: float = 1.0
    only: str | None = None


async def run(options: Options, server_address: str) -> list[Result] | dict[int, Sample]:
    """Measure against a running echo server: Results, or with `only` that side's Samples."""
    payload = b"x" * options.payload
    bare_channel = aio.insecure_channel(server_address, options=keepalive.client_options())
    resolver = StaticResolver({SERVICE: [server_address]})
    mesh_channel = mesh.channel(SERVICE, resolver=resolver, policy=ServicePolicy())
    try:
        sides: dict[str, Call] = {
            "bare": _method(bare_channel),
            "mesh": _method(mesh_channel),
        }
        await bare_channel.channel_ready()
        if not await mesh_channel.wait_for_endpoints(timeout=10.0):
            raise RuntimeError("the mesh channel found no endpoint")
        for name, call in sides.items():
            if await call(payload) != payload:
                raise RuntimeError(f"{name}: the echo did not echo")
        if options.only is not None:
            call = sides[options.only]
            samples: dict[int, Sample] = {}
            for n in options.concurrency:
                await measure(call, payload, n, options.warmup)
                total = Sample()
                for _ in range(options.rounds):
                    total.add(await measure(call, payload, n, options.duration))
                samples[n] = total
            return samples
        results = []
        for n in options.concurrency:
            for call in sides.values():
                await measure(call, payload, n, options.warmup)
            totals = {"bare": Sample(), "mesh": Sample()}
            round_ratios = []
            for index in range(options.rounds):
                order = ("bare", "mesh") if index % 2 == 0 else ("mesh", "bare")
                this_round = {}
                for name in order:
                    this_round[name] = await measure(sides[name], payload, n, options.duration)
                    totals[name].add(this_round[name])
                bare_rate = this_round["bare"].rate
                round_ratios.append(this_round["mesh"].rate / bare_rate if bare_rate else 0.0)
            results.append(compare(n, totals["bare"], totals["mesh"], round_ratios))
        return results
    finally:
        await bare_channel.close(None)
        await mesh_channel.close()
        await resolver.close()


# -- output ---------------------------------------------------------------------------------


def _describe_policy(policy: ServicePolicy) -> str:
    method = policy.defaults
    return (
        f"{policy.balancer}, retry max_attempts={method.retry.max_attempts} + budget "
        f"{policy.budget.ratio:g}, breaker {policy.breaker.failure_rate_threshold:g}, "
        f"bulkhead {policy.bulkhead.max_concurrent}, ejection after "
        f"{policy.ejection.consecutive_failures}, deadline {method.timeout:g}s"
    )


def render(options: Options, results: list[Result]) -> str:
    lines = [
        f"mesh/bare overhead: {options.rounds} alternating rounds x {options.duration:g} s per "
        f"side, payload {options.payload} B, method {METHOD}",
        f"mesh policy: {_describe_policy(ServicePolicy())}",
    ]
    for r in results:
        lines += [
            "",
            f"concurrency {r.concurrency}",
            f"  {'':10}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/call':>13}{'errors':>8}",
        ]
        for name, s in (("bare", r.bare), ("mesh", r.mesh)):
            lines.append(
                f"  {name:10}{s['calls_per_s']:>10.0f}{s['p50_ms']:>10.3f}"
                f"{s['p99_ms']:>10.3f}{s['client_cpu_us_per_call']:>13.0f}{s['errors']:>8}"
            )
        q = r.ratios
        lines.append(
            f"  {'mesh/bare':10}{q['throughput']:>10.3f}{q['p50']:>10.3f}{q['p99']:>10.3f}"
            f"{q['client_cpu']:>13.3f}"
        )
        per_round = " ".join(f"{x:.3f}" for x in r.round_throughput_ratios)
        lines.append(f"  throughput ratio per round: {per_round}")
        p50_extra = (r.mesh["p50_ms"] - r.bare["p50_ms"]) * 1e3
        cpu_extra = r.mesh["client_cpu_us_per_call"] - r.bare["client_cpu_us_per_call"]
        lines.append(
            f"  extra per call: p50 {p50_extra:+.0f} us, "
            f"1/throughput {r.extra_time_per_call_us:+.0f} us, client CPU {cpu_extra:+.0f} us"
        )
        lines.append(
            f"  goal: throughput {q['throughput']:.3f} >= {THROUGHPUT_GOAL} "
            f"{'ok' if q['throughput'] >= THROUGHPUT_GOAL else 'MISSED'}, "
            f"p50 {q['p50']:.3f} <= {P50_GOAL} {'ok' if q['p50'] <= P50_GOAL else 'MISSED'}"
            f" -> {'MET' if r.goal_met else 'NOT MET'}"
        )
    return "\n".join(lines)


def _positive_ints(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.replace(",", " ").split())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers like 1,32; got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-call cost of a mesh channel against bare grpc.aio (see module doc)."
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round per side")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side")
    parser.add_argument(
        "--concurrency", type=_positive_ints, default=(1, 32), help="tasks in flight, e.g. 1,32"
    )
    parser.add_argument("--payload", type=int, default=64, help="request (and reply) bytes")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per side, unmeasured")
    parser.add_argument(
        "--only", choices=("bare", "mesh"), help="run one side only (for profilers); no ratios"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.payload < 0 or args.warmup < 0:
        parser.error("--duration must be > 0, --rounds >= 1, --payload and --warmup >= 0")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that `finally` stops the server


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return 0
    options = Options(
        args.duration, args.rounds, args.concurrency, args.payload, args.warmup, args.only
    )
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    server = EchoServer()
    try:

        async def bench() -> list[Result] | dict[int, Sample]:
            await server.wait_ready()
            return await run(options, server.address)

        outcome = asyncio.run(bench())
    finally:
        server.stop()
    if isinstance(outcome, dict):
        sides = {n: summary(s) for n, s in outcome.items()}
        if args.json:
            print(json.dumps({"side": options.only, "concurrency": sides}, indent=2))
        else:
            for n, s in sides.items():
                print(
                    f"{options.only} concurrency {n}: {s['calls_per_s']:.0f} calls/s, "
                    f"p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, {s['errors']} errors"
                )
        return 1 if any(s["errors"] for s in sides.values()) else 0
    if args.json:
        document = {
            "options": asdict(options),
            "goal": {"throughput_ratio_min": THROUGHPUT_GOAL, "p50_ratio_max": P50_GOAL},
            "results": [asdict(r) for r in outcome],
            "goal_met": all(r.goal_met for r in outcome),
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(options, outcome))
    return 1 if any(r.bare["errors"] or r.mesh["errors"] for r in outcome) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
