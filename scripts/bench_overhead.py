"""What a mesh channel costs per call, against bare grpc.aio to the same server.

    python scripts/bench_overhead.py                      # 5 rounds x 3 s, concurrency 1 and 32
    python scripts/bench_overhead.py --duration 2 --rounds 4 --json
    python scripts/bench_overhead.py --only mesh --concurrency 32   # one side, for a profiler
    python scripts/bench_overhead.py --tracing on --sample-ratio 0.01  # as above, traced

Why: the mesh exists because a sidecar's two proxy hops cost too much per call, so its own cost
per call must stay far below theirs (../shared/design.md). That cost is the Python work the
call path adds on top of grpc.aio (deadline, breaker, bulkhead, retry state and budget, P2C
over peak-EWMA, outlier ejection, load and latency bookkeeping), so the baseline is the same
call on a bare `grpc.aio.insecure_channel` in the same process, against the same server.

How: one echo server runs in a child process (a grpc.aio server with one unary-unary method,
/bench.Echo/Call, that returns its request bytes), so client and server do not share an event
loop. The client process opens a bare channel and a `mesh.channel("echo")` over a
StaticResolver with the default ServicePolicy (every resilience layer on; no tracing unless
--tracing on, below).
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

With `--tracing on`, both sides are instrumented as in production, and the tracing pipeline
is part of what is measured: a local OTLP/gRPC receiver (`python -m mesh.telemetry.receiver
--no-store`) runs in a third child process; the echo server gets OpenTelemetry's server
interceptor, and the client process one TracerProvider (mesh.telemetry.tracing.tracing_to),
each batch-exporting (BatchSpanProcessor, OTLP/gRPC) to the receiver, sampler
`parentbased_traceidratio` with `--sample-ratio` (set through OTEL_TRACES_SAMPLER and
OTEL_TRACES_SAMPLER_ARG, which the SDK reads, for all three processes). The "bare" side is then
grpc.aio with the stock client instrumentor (opentelemetry-instrumentation-grpc's interceptors,
`Tracing.client_interceptors()`), the mesh side `mesh.channel(..., tracing=...)` (its call
span, and an attempt span per attempt that is the gRPC client span), and a third side, "plain", is
grpc.aio without instrumentation (to the same instrumented server), so that bare/plain shows
what the stock instrumentor alone costs. Rounds rotate over the three sides. The exporter's
thread competes with the calls for the client's CPU (and the GIL), and the receiver with both
processes for the machine's cores: that is part of the cost. The table then also shows the
server's and the receiver's CPU time per call (from /proc, where there is one). The goal with
tracing is a mesh/bare throughput ratio >= 0.85 at sample ratios above 0.01 and >= 0.95 at
0.01 and below; there is no p50 goal with tracing. Spans dropped because an export queue was
full (the exporter fell behind) are counted, per side for the client, at exit for the server,
and shown when there are any: a run that drops spans understates the cost of tracing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import FrameType

from opentelemetry.sdk.resources import Resource

_PROJECT = str(Path(__file__).resolve().parent.parent)
# Run as a script, only scripts/ is on sys.path; the project is not.
if _PROJECT not in sys.path:
    sys.path.insert(0, _PROJECT)

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

import mesh  # noqa: E402
from mesh.core import keepalive  # noqa: E402
from mesh.discovery import StaticResolver  # noqa: E402
from mesh.policy import ServicePolicy  # noqa: E402
from mesh.telemetry.tracing import Tracing, tracing_to  # noqa: E402
from scripts.bench_harness import (  # noqa: E402
    ECHO_METHOD,
    HOST,
    PROJECT_ROOT,
    Call,
    Sample,
    ServerProcess,
    Watch,
    echo,
    echo_method,
    measure,
    percentile,
    serve_until_signalled,
)
from scripts.processes import free_tcp_port, log_tail, spawn, stop_process, wait_until  # noqa: E402

SERVICE = "echo"
METHOD = ECHO_METHOD
THROUGHPUT_GOAL = 0.95
"""mesh/bare calls per second must be at least this (without tracing)."""
P50_GOAL = 1.05
"""mesh/bare median latency must be at most this (without tracing)."""
TRACED_THROUGHPUT_GOAL = 0.85
"""mesh/bare calls per second with tracing, both sides instrumented, at sample ratios above
LOW_SAMPLE_RATIO."""
LOW_SAMPLE_RATIO = 0.01
"""At or below this sample ratio, the goal with tracing is THROUGHPUT_GOAL."""

# -- the server (child process) -------------------------------------------------------------


async def serve(port: int, trace_endpoint: str | None = None) -> None:
    """Serve /bench.Echo/Call on HOST:port until SIGTERM or SIGINT; with `trace_endpoint`,
    traced as in production (OpenTelemetry's server interceptor, spans exported there)."""
    tracing = None
    interceptors = []
    dropped = None
    if trace_endpoint is not None:
        dropped = DroppedSpans().install()
        tracing = tracing_to(trace_endpoint, Resource.create({"service.name": SERVICE}))
        interceptors.append(tracing.server_interceptor())
    server = aio.server(options=keepalive.server_options(), interceptors=interceptors)
    handlers = {"Call": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_registered_method_handlers("bench.Echo", handlers)  # type: ignore[attr-defined]
    await serve_until_signalled(server, port)
    if tracing is not None:
        await asyncio.to_thread(tracing.shutdown)  # flushes; blocking, so off the loop
    if dropped is not None and dropped():
        print(f"echo server: {dropped()} spans dropped (export queue full)", file=sys.stderr)


def _server_command(trace_endpoint: str | None, port: int) -> list[str]:
    """This script's --serve mode on `port`, traced to `trace_endpoint` when given."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port)]
    if trace_endpoint is not None:
        command += ["--trace-endpoint", trace_endpoint]
    return command


class ReceiverProcess:
    """`python -m mesh.telemetry.receiver --no-store` in a child process, on a free port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_tcp_port(HOST)
        self.endpoint = f"http://{HOST}:{self.port}"
        self._log = log_dir / "receiver.log"
        command = [sys.executable, "-m", "mesh.telemetry.receiver", "--no-store"]
        command += ["--host", HOST, "--port", str(self.port)]
        self._proc = spawn(command, cwd=PROJECT_ROOT, log_path=self._log)
        self.pid = self._proc.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the receiver accepts connections (fails early if it exits)."""

        def listening() -> bool:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"trace receiver exited with {self._proc.returncode}:\n{log_tail(self._log)}"
                )
            with socket.create_connection((HOST, self.port), timeout=1.0):
                return True

        wait_until(
            listening,
            timeout=timeout,
            message=f"trace receiver on {self.endpoint} did not listen",
            ignore=(OSError,),
        )

    def stop(self) -> None:
        stop_process(self._proc, timeout=5.0)


class DroppedSpans(logging.Filter):
    """Counts the spans this process's BatchSpanProcessors drop because their queue is full.

    The SDK says so only in a log record per span ("Queue full, dropping Span."), behind a
    filter that lets one through per 20 s; its own counter of drops (an internal metric)
    would also turn on per-span metrics in every tracer, which would change what is
    measured. So this filter goes first on that logger and counts every record."""

    LOGGER = "opentelemetry.sdk._shared_internal"

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Queue full, dropping"):
            self.count += 1
        return True

    def install(self) -> DroppedSpans:
        logging.getLogger(self.LOGGER).filters.insert(0, self)
        return self

    def __call__(self) -> int:
        return self.count


# -- measuring ------------------------------------------------------------------------------


def summary(sample: Sample) -> dict[str, float]:
    ordered = sorted(sample.latencies)
    per_call = 1e6 / sample.calls if sample.calls else 0.0
    result = {
        "calls": sample.calls,
        "errors": sample.errors,
        "calls_per_s": sample.rate,
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "client_cpu_us_per_call": sample.cpu * per_call,
        "dropped_spans": sample.dropped_spans,
    }
    for name, seconds in sample.peer_cpu.items():
        result[f"{name}_cpu_us_per_call"] = seconds * per_call
    return result


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
    plain: dict[str, float] | None = None
    """With tracing: grpc.aio without the client instrumentor."""
    instrumentor_ratios: dict[str, float] | None = None
    """With tracing: bare/plain, what the stock client instrumentor alone costs."""


def _ratios(side: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    def ratio(key: str) -> float:
        return side[key] / base[key] if base[key] else 0.0

    return {
        "throughput": ratio("calls_per_s"),
        "p50": ratio("p50_ms"),
        "p99": ratio("p99_ms"),
        "client_cpu": ratio("client_cpu_us_per_call"),
    }


def compare(
    concurrency: int,
    totals: Mapping[str, Sample],
    rounds: list[float],
    goals: tuple[float, float | None],
) -> Result:
    """mesh against bare (and, when measured, bare against plain) at one concurrency."""
    b, m = summary(totals["bare"]), summary(totals["mesh"])
    ratios = _ratios(m, b)
    extra = (1 / m["calls_per_s"] - 1 / b["calls_per_s"]) * 1e6 if m["calls"] and b["calls"] else 0
    throughput_goal, p50_goal = goals
    met = ratios["throughput"] >= throughput_goal and (
        p50_goal is None or ratios["p50"] <= p50_goal
    )
    errors = b["errors"] or m["errors"]
    plain = summary(totals["plain"]) if "plain" in totals else None
    instrumentor = _ratios(b, plain) if plain is not None else None
    errors = errors or (plain is not None and plain["errors"])
    return Result(concurrency, b, m, ratios, rounds, extra, met and not errors, plain, instrumentor)


@dataclass(frozen=True)
class Options:
    duration: float = 3.0
    rounds: int = 5
    concurrency: tuple[int, ...] = (1, 32)
    payload: int = 64
    warmup: float = 1.0
    only: str | None = None
    tracing: bool = False
    sample_ratio: float = 1.0

    @property
    def goals(self) -> tuple[float, float | None]:
        """The throughput ratio's minimum and the p50 ratio's maximum (None: no p50 goal)."""
        if not self.tracing:
            return THROUGHPUT_GOAL, P50_GOAL
        if self.sample_ratio <= LOW_SAMPLE_RATIO:
            return THROUGHPUT_GOAL, None
        return TRACED_THROUGHPUT_GOAL, None


async def run(
    options: Options,
    server_address: str,
    tracing: Tracing | None = None,
    watch: Watch | None = None,
) -> list[Result] | dict[int, Sample]:
    """Measure against a running echo server: Results, or with `only` that side's Samples.

    With `tracing`, the bare side carries its client interceptors, the mesh side its spans,
    and a third side, plain, is grpc.aio without instrumentation. `watch` says what else to
    measure with each side."""
    payload = b"x" * options.payload
    channel_options = keepalive.client_options()
    interceptors = tracing.client_interceptors() if tracing is not None else None
    channels = {
        "bare": aio.insecure_channel(
            server_address, options=channel_options, interceptors=interceptors
        )
    }
    if tracing is not None:
        channels["plain"] = aio.insecure_channel(server_address, options=channel_options)
    resolver = StaticResolver({SERVICE: [server_address]})
    mesh_channel = mesh.channel(SERVICE, resolver=resolver, policy=ServicePolicy(), tracing=tracing)
    try:
        sides: dict[str, Call] = {name: echo_method(channel) for name, channel in channels.items()}
        sides["mesh"] = echo_method(mesh_channel)
        for channel in channels.values():
            await channel.channel_ready()
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
                    total.add(await measure(call, payload, n, options.duration, watch))
                samples[n] = total
            return samples
        results = []
        names = list(sides)
        for n in options.concurrency:
            for call in sides.values():
                await measure(call, payload, n, options.warmup)
            totals = {name: Sample() for name in names}
            round_ratios = []
            for index in range(options.rounds):
                # Rotate which side goes first, so that each side runs in each position.
                shift = index % len(names)
                this_round = {}
                for name in names[shift:] + names[:shift]:
                    this_round[name] = await measure(
                        sides[name], payload, n, options.duration, watch
                    )
                    totals[name].add(this_round[name])
                bare_rate = this_round["bare"].rate
                round_ratios.append(this_round["mesh"].rate / bare_rate if bare_rate else 0.0)
            results.append(compare(n, totals, round_ratios, options.goals))
        return results
    finally:
        for channel in channels.values():
            await channel.close(None)
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


def _describe_tracing(options: Options) -> list[str]:
    if not options.tracing:
        return ["tracing: off"]
    throughput_goal, _ = options.goals
    return [
        f"tracing: on, sample ratio {options.sample_ratio:g} (parentbased_traceidratio), "
        "batch export over OTLP/gRPC to a local receiver (child process); server instrumented",
        "  plain = grpc.aio uninstrumented, bare = grpc.aio + stock client instrumentor, "
        "mesh = MeshChannel with tracing",
        f"  goal with tracing: mesh/bare throughput >= {throughput_goal} (no p50 goal); "
        f"{TRACED_THROUGHPUT_GOAL} above sample ratio {LOW_SAMPLE_RATIO:g}, "
        f"{THROUGHPUT_GOAL} at or below",
    ]


_PEERS = (("server", "server CPU"), ("receiver", "recv CPU"))
"""Per-call CPU columns of the other processes, shown when measured."""


def render(options: Options, results: list[Result]) -> str:
    lines = [
        f"mesh/bare overhead: {options.rounds} alternating rounds x {options.duration:g} s per "
        f"side, payload {options.payload} B, method {METHOD}",
        f"mesh policy: {_describe_policy(ServicePolicy())}",
        *_describe_tracing(options),
    ]
    for r in results:
        rows = (("plain", r.plain), ("bare", r.bare), ("mesh", r.mesh))
        shown = [(name, s) for name, s in rows if s is not None]
        peers = [(key, title) for key, title in _PEERS if f"{key}_cpu_us_per_call" in r.bare]
        lines += [
            "",
            f"concurrency {r.concurrency}",
            f"  {'':10}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/call':>13}{'errors':>8}"
            + "".join(f"{title:>12}" for _, title in peers),
        ]
        for name, s in shown:
            lines.append(
                f"  {name:10}{s['calls_per_s']:>10.0f}{s['p50_ms']:>10.3f}"
                f"{s['p99_ms']:>10.3f}{s['client_cpu_us_per_call']:>13.0f}{s['errors']:>8}"
                + "".join(f"{s.get(f'{key}_cpu_us_per_call', 0.0):>12.0f}" for key, _ in peers)
            )
        q = r.ratios
        lines.append(
            f"  {'mesh/bare':10}{q['throughput']:>10.3f}{q['p50']:>10.3f}{q['p99']:>10.3f}"
            f"{q['client_cpu']:>13.3f}"
        )
        if r.instrumentor_ratios is not None:
            i = r.instrumentor_ratios
            lines.append(
                f"  {'bare/plain':10}{i['throughput']:>10.3f}{i['p50']:>10.3f}{i['p99']:>10.3f}"
                f"{i['client_cpu']:>13.3f}   <- the stock client instrumentor alone"
            )
        if any(s["dropped_spans"] for _, s in shown):
            drops = ", ".join(f"{name} {s['dropped_spans']:.0f}" for name, s in shown)
            lines.append(f"  spans dropped by the client (export queue full): {drops}")
        per_round = " ".join(f"{x:.3f}" for x in r.round_throughput_ratios)
        lines.append(f"  throughput ratio per round: {per_round}")
        p50_extra = (r.mesh["p50_ms"] - r.bare["p50_ms"]) * 1e3
        cpu_extra = r.mesh["client_cpu_us_per_call"] - r.bare["client_cpu_us_per_call"]
        lines.append(
            f"  extra per call: p50 {p50_extra:+.0f} us, "
            f"1/throughput {r.extra_time_per_call_us:+.0f} us, client CPU {cpu_extra:+.0f} us"
        )
        throughput_goal, p50_goal = options.goals
        goal = (
            f"  goal: throughput {q['throughput']:.3f} >= {throughput_goal} "
            f"{'ok' if q['throughput'] >= throughput_goal else 'MISSED'}"
        )
        if p50_goal is not None:
            goal += (
                f", p50 {q['p50']:.3f} <= {p50_goal} {'ok' if q['p50'] <= p50_goal else 'MISSED'}"
            )
        lines.append(f"{goal} -> {'MET' if r.goal_met else 'NOT MET'}")
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
        "--only",
        choices=("plain", "bare", "mesh"),
        help="run one side only (for profilers); no ratios (plain: only with --tracing on)",
    )
    parser.add_argument(
        "--tracing",
        choices=("off", "on"),
        default="off",
        help="on: both sides and the server traced as in production, exporting to a local "
        "receiver (see module doc)",
    )
    parser.add_argument(
        "--sample-ratio",
        type=float,
        default=1.0,
        help="with --tracing on: the share of traces sampled (parentbased_traceidratio)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--trace-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.payload < 0 or args.warmup < 0:
        parser.error("--duration must be > 0, --rounds >= 1, --payload and --warmup >= 0")
    if not 0.0 <= args.sample_ratio <= 1.0:
        parser.error("--sample-ratio must be between 0 and 1")
    if args.only == "plain" and args.tracing != "on":
        parser.error("--only plain needs --tracing on (without tracing, plain is bare)")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that `finally` stops the server


def _measure(options: Options) -> list[Result] | dict[int, Sample]:
    """Start the echo server (and with tracing the receiver first), measure, stop them; the
    client's and the server's spans are flushed to the receiver before it stops."""
    with contextlib.ExitStack() as stack:
        receiver = None
        if options.tracing:
            # The SDK reads the sampler from the environment when a TracerProvider is made:
            # ours below, and the server's, which inherits the environment.
            os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            os.environ["OTEL_TRACES_SAMPLER_ARG"] = repr(options.sample_ratio)
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-overhead-"))
            receiver = ReceiverProcess(Path(log_dir))
            stack.callback(receiver.stop)
            receiver.wait_ready()
        server = ServerProcess(partial(_server_command, receiver.endpoint if receiver else None))
        stack.callback(server.stop)  # the server flushes its spans on the way out
        tracing = watch = None
        if receiver is not None:
            dropped = DroppedSpans().install()
            tracing = tracing_to(
                receiver.endpoint, Resource.create({"service.name": "bench-client"})
            )
            stack.callback(tracing.shutdown)  # blocking: after the event loop has ended
            watch = Watch({"server": server.pid, "receiver": receiver.pid}, dropped)

        async def bench() -> list[Result] | dict[int, Sample]:
            await server.wait_ready()
            return await run(options, server.address, tracing, watch)

        return asyncio.run(bench())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.trace_endpoint))
        return 0
    options = Options(
        args.duration,
        args.rounds,
        args.concurrency,
        args.payload,
        args.warmup,
        args.only,
        args.tracing == "on",
        args.sample_ratio,
    )
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    outcome = _measure(options)
    if isinstance(outcome, dict):
        sides = {n: summary(s) for n, s in outcome.items()}
        if args.json:
            print(json.dumps({"side": options.only, "concurrency": sides}, indent=2))
        else:
            print(_describe_tracing(options)[0])
            for n, s in sides.items():
                print(
                    f"{options.only} concurrency {n}: {s['calls_per_s']:.0f} calls/s, "
                    f"p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, {s['errors']} errors"
                )
        return 1 if any(s["errors"] for s in sides.values()) else 0
    if args.json:
        throughput_goal, p50_goal = options.goals
        document = {
            "options": asdict(options),
            "goal": {"throughput_ratio_min": throughput_goal, "p50_ratio_max": p50_goal},
            "results": [asdict(r) for r in outcome],
            "goal_met": all(r.goal_met for r in outcome),
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(options, outcome))
    return (
        1
        if any(
            r.bare["errors"] or r.mesh["errors"] or (r.plain or {}).get("errors") for r in outcome
        )
        else 0
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
