"""What the benchmarks share: a server in a child process, closed-loop measurement, CPU time.

scripts/bench_overhead.py (the mesh channel against bare grpc.aio) and scripts/bench_load.py
(meshctl load against a hand-written loop) measure the same way: a server in its own process
group that dies with the benchmark, `concurrency` tasks each calling in sequence for a
duration, every latency kept for nearest-rank percentiles, and the CPU seconds of the client
and of the processes beside it read from /proc. Each script imports this module; neither
imports the other.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from scripts.processes import free_tcp_port, spawn, stop_process

PROJECT_ROOT = Path(__file__).resolve().parent.parent

HOST = "127.0.0.1"
ECHO_METHOD = "/bench.Echo/Call"
"""The echo every benchmark server serves: raw bytes back as they came."""

Call = Callable[[bytes], Awaitable[bytes]]


def echo_method(channel: aio.Channel) -> aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """ECHO_METHOD on `channel`: raw bytes both ways, registered as generated stubs do."""
    return channel.unary_unary(ECHO_METHOD, _registered_method=True)  # type: ignore[call-arg]


async def echo(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def serve_until_signalled(server: aio.Server, port: int) -> None:
    """Start `server` on HOST:port, serve until SIGTERM or SIGINT, then stop it."""
    if server.add_insecure_port(f"{HOST}:{port}") != port:
        raise SystemExit(f"bench server: cannot bind {HOST}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


class ServerProcess:
    """A benchmark server in a child process on a free port (its own process group, dying
    with us): `command(port)` starts it; it must serve ECHO_METHOD, which readiness calls."""

    def __init__(self, command: Callable[[int], list[str]]) -> None:
        self.port = free_tcp_port(HOST)
        self.address = f"{HOST}:{self.port}"
        self._proc = spawn(command(self.port))
        self.pid = self._proc.pid

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until one echo call succeeds (fails early if the child exits)."""
        deadline = time.monotonic() + timeout
        async with aio.insecure_channel(self.address) as channel:
            call = echo_method(channel)
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"bench server exited with {self._proc.returncode}")
                try:
                    if await call(b"ping", timeout=1.0, wait_for_ready=True) == b"ping":
                        return
                except aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bench server on {self.address} did not answer")

    def stop(self) -> None:
        stop_process(self._proc, timeout=5.0)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used so far; None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass(frozen=True)
class Watch:
    """What is measured alongside each side's calls, beyond the client's own CPU time."""

    peers: Mapping[str, int] = field(default_factory=dict)
    """Other processes (name: pid) whose CPU time counts."""
    dropped_spans: Callable[[], int] | None = None
    """Spans the client's tracing has dropped so far (see DroppedSpans)."""



# -- measuring ------------------------------------------------------------------------------


@dataclass
class Sample:
    """One side's calls over one or more rounds."""

    calls: int = 0
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    """Client process CPU seconds (every thread: ours and gRPC's)."""
    peer_cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds of the other processes (server, receiver) meanwhile, where measurable."""
    dropped_spans: int = 0
    """Spans the client's tracing dropped meanwhile (its export queue was full)."""
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.elapsed += other.elapsed
        self.cpu += other.cpu
        self.dropped_spans += other.dropped_spans
        for name, seconds in other.peer_cpu.items():
            self.peer_cpu[name] = self.peer_cpu.get(name, 0.0) + seconds
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


async def measure(
    call: Call,
    payload: bytes,
    concurrency: int,
    duration: float,
    watch: Watch | None = None,
) -> Sample:
    """`concurrency` tasks each calling `call` in sequence for `duration` seconds; what
    `watch` names is measured over the same time."""
    sample = Sample()
    peers = watch.peers if watch is not None else {}
    dropped = watch.dropped_spans if watch is not None else None
    dropped_before = dropped() if dropped is not None else 0
    peers_started = {name: process_cpu(pid) for name, pid in peers.items()}
    cpu_started = time.process_time()
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(*(_worker(call, payload, stop_at, sample) for _ in range(concurrency)))
    sample.elapsed = time.perf_counter() - started
    sample.cpu = time.process_time() - cpu_started
    for name, pid in peers.items():
        before, after = peers_started[name], process_cpu(pid)
        if before is not None and after is not None:
            sample.peer_cpu[name] = after - before
    if dropped is not None:
        sample.dropped_spans = dropped() - dropped_before
    sample.calls = len(sample.latencies)
    return sample


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile (0 < q <= 1) of sorted values; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = math.ceil(q * len(ordered) - 1e-9)
    return ordered[min(max(rank, 1), len(ordered)) - 1]


