"""The call loops of one worker: `concurrency` tasks on one event loop, closed or open model.

Closed model (no rate): each task calls, waits for the answer, calls again, until the run's
total is reached (one shared counter, so the total is exact) or its duration is over. What it
measures is the service's latency *at the throughput the loop achieves*; if the service
stalls, the loop stalls with it and sends nothing meanwhile.

Open model (`rate`): calls start on a fixed schedule, t0 + j/rate for the run's j-th call,
whether earlier calls have finished or not, as a population of users would send them, and
each call's latency is counted from its *scheduled* start. A stall then shows with its true
weight: the calls that should have started during it carry the time they waited. A tool that
counts from the actual start (or waits before it sends) makes that waiting vanish, Gil Tene's
"coordinated omission"; wrk2 schedules the same way. The concurrency still caps the calls in
flight (each task takes the next slot of the schedule when it is free), and a call held back
by the cap counts its wait. How far behind schedule calls started (`max_lag`) tells whether
the schedule was kept: a large lag with a fast server means the generator was the bottleneck.
A run with a duration ends on time: calls due before its end that could not start by then
are not sent but counted (`missed`), since their latency, had they been sent, would be
missing from the tail. A task sleeps until `slack` (1 ms, the event loop's timer resolution
with epoll) before its slot and then starts at once, so that timer overshoot does not add to
the latency; a call started early is measured from its actual start.

Several workers (meshctl/load/workers.py) split a run exactly: worker w of K has
concurrency C/K, total N/K and rate r/K (remainders go to the first workers), and its i-th
call is the run's call j = i*K + w, both for the schedule (so workers interleave) and for the
{{n}} of request templates (so numbers never repeat across workers).

Calls send and receive raw bytes (the template is serialized once or rendered per call, the
answer is not parsed), so the generator pays no protobuf work per call beyond the template's,
and ended calls reach the recorder in batches (see _Phase): with both, one worker makes as
many calls per second as a minimal hand-written grpc.aio loop (scripts/bench_load.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpc import aio

from meshctl.load.errors import BadInput
from meshctl.load.request import MethodInfo, RequestTemplate
from meshctl.load.stats import Call, CallRecorder
from meshctl.load.target import Metadata

DEFAULT_CONCURRENCY = 50
DEFAULT_TOTAL = 200
"""Calls in a run that names neither a total nor a duration (as ghz)."""
DEFAULT_TIMEOUT = 20.0
SCHEDULE_SLACK = 0.001
"""Open model: how early before its slot a call may start (see module doc)."""
RECORD_BATCH = 128
"""Ended calls recorded together (see _Phase); progress lags by at most this many."""

Invoke = Callable[[Sequence[bytes]], Awaitable[Any]]
"""Makes one call with the serialized request message(s); raises AioRpcError on failure."""
Record = Callable[[list[Call]], None]
"""CallRecorder.record_many: records a batch of ended calls."""


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How much load a whole run sends: the command line's numbers, checked."""

    concurrency: int = DEFAULT_CONCURRENCY
    total: int | None = None
    """Calls to make (warm-up excluded); with `duration`, whichever ends first."""
    duration: float | None = None
    """Seconds to send for (warm-up excluded)."""
    rate: float | None = None
    """Calls started per second on schedule (open model); None: closed model."""
    warmup: float = 0.0
    """Seconds of load before the measured run, not recorded."""
    timeout: float = DEFAULT_TIMEOUT
    """Deadline of each call, seconds."""
    workers: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise BadInput(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.total is not None and self.total < 1:
            raise BadInput(f"--total must be at least 1, got {self.total}")
        if self.duration is not None and not self.duration > 0:
            raise BadInput(f"--duration must be > 0, got {self.duration:g} s")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise BadInput(f"--rate must be > 0 calls/s, got {self.rate:g}")
        if not self.warmup >= 0:
            raise BadInput(f"--warmup must be >= 0, got {self.warmup:g} s")
        if not self.timeout > 0:
            raise BadInput(f"--timeout must be > 0, got {self.timeout:g} s")
        if self.workers < 1:
            raise BadInput(f"--workers must be at least 1, got {self.workers}")
        if self.workers > self.concurrency:
            raise BadInput(
                f"--workers ({self.workers}) must not exceed --concurrency ({self.concurrency}):"
                " each worker needs at least one call in flight"
            )
        if self.total is not None and self.workers > self.total:
            raise BadInput(f"--workers ({self.workers}) must not exceed --total ({self.total})")

    @property
    def bounded_total(self) -> int | None:
        """The total to stop at: the one given, DEFAULT_TOTAL with neither total nor duration."""
        return DEFAULT_TOTAL if self.total is None and self.duration is None else self.total

    def shares(self) -> list[WorkerShare]:
        """Each worker's exact part of the run (remainders to the first workers)."""
        total = self.bounded_total
        return [
            WorkerShare(
                index=w,
                workers=self.workers,
                concurrency=split(self.concurrency, self.workers, w),
                total=None if total is None else split(total, self.workers, w),
                duration=self.duration,
                rate=self.rate,
                warmup=self.warmup,
                timeout=self.timeout,
            )
            for w in range(self.workers)
        ]


def split(amount: int, parts: int, index: int) -> int:
    """Part `index` of `amount` split into `parts` as evenly as integers go, the first
    `amount % parts` parts one larger; the parts add up to `amount`."""
    return amount // parts + (1 if index < amount % parts else 0)


@dataclass(frozen=True, slots=True)
class WorkerShare:
    """One worker's part of a run (see LoadPlan.shares)."""

    index: int
    workers: int
    concurrency: int
    total: int | None
    duration: float | None
    rate: float | None
    """The whole run's rate: this worker starts every `workers`-th slot of its schedule."""
    warmup: float
    timeout: float

    def call_number(self, i: int) -> int:
        """The run-wide number of this worker's i-th call."""
        return i * self.workers + self.index

    def scheduled(self, i: int) -> float:
        """Open model: seconds after t0 at which this worker's i-th call is due."""
        assert self.rate is not None
        return self.call_number(i) / self.rate


def invoker(
    channel: aio.Channel, method: MethodInfo, timeout: float, metadata: Metadata | None
) -> Invoke:
    """One call of `method` on `channel`, whatever its shape, bytes in and out; a
    server-streaming answer is read to its end (one call, one latency)."""
    path = method.path
    if not method.client_streaming and not method.server_streaming:
        unary = channel.unary_unary(path, _registered_method=True)  # type: ignore[call-arg]

        def unary_unary(requests: Sequence[bytes]) -> Awaitable[Any]:
            return unary(requests[0], timeout=timeout, metadata=metadata)

        return unary_unary
    if not method.server_streaming:
        upload = channel.stream_unary(path, _registered_method=True)  # type: ignore[call-arg]

        def stream_unary(requests: Sequence[bytes]) -> Awaitable[Any]:
            return upload(iter(requests), timeout=timeout, metadata=metadata)

        return stream_unary
    if method.client_streaming:
        both = channel.stream_stream(path, _registered_method=True)  # type: ignore[call-arg]

        async def stream_stream(requests: Sequence[bytes]) -> None:
            async for _ in both(iter(requests), timeout=timeout, metadata=metadata):
                pass

        return stream_stream
    download = channel.unary_stream(path, _registered_method=True)  # type: ignore[call-arg]

    async def unary_stream(requests: Sequence[bytes]) -> None:
        async for _ in download(requests[0], timeout=timeout, metadata=metadata):
            pass

    return unary_stream


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """How a measured run went, beyond what its recorder holds."""

    elapsed: float
    """Seconds from the start until the last call ended."""
    max_lag: float
    """Open model: the most a call started behind its schedule (0 in the closed model)."""
    interrupted: bool
    missed: int = 0
    """Open model with a duration: calls due before its end that had not started by then
    (held back by --concurrency, or a generator too slow for the rate); never sent."""

    @classmethod
    def combined(cls, phases: Sequence[PhaseResult]) -> PhaseResult:
        """Several workers' phases as one run: the longest, the largest lag, interrupted if
        any was, the missed calls of all."""
        return cls(
            max(phase.elapsed for phase in phases),
            max(phase.max_lag for phase in phases),
            any(phase.interrupted for phase in phases),
            sum(phase.missed for phase in phases),
        )


class _Phase:
    """The state one phase's tasks share (slots: the hot path reads these attributes).

    Calls are recorded in batches: each ended call appends (start, latency, code, details)
    to `ended`, and every RECORD_BATCH calls they go into the recorder in one tight loop.
    Recording one call at a time, between gRPC's own work, costs several times more (the
    histogram's code and counters are out of the CPU's caches by then; measured 7.5 us a
    call against 1.6 us in a batch, at 4,500 calls/s); the batch keeps it off the hot path,
    and CallRecorder.record_many takes the whole batch in one loop (0.55 us a call).
    """

    __slots__ = ("ended", "issued", "limit", "max_lag", "record", "start", "stop_at")

    def __init__(self, start: float, limit: float, stop_at: float, record: Record) -> None:
        self.start = start
        self.limit = limit
        self.stop_at = stop_at
        self.record = record
        self.issued = 0
        self.max_lag = 0.0
        self.ended: list[Call] = []

    def flush(self) -> None:
        """Record the calls ended since the last flush."""
        self.record(self.ended)
        self.ended.clear()


def _discard(calls: list[Call]) -> None:
    """The recorder of the warm-up."""


class CallLoop:
    """One worker's calls: an optional warm-up, then the measured run into a recorder."""

    def __init__(
        self,
        invoke: Invoke,
        template: RequestTemplate,
        share: WorkerShare,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        slack: float = SCHEDULE_SLACK,
    ) -> None:
        self._invoke = invoke
        self._template = template
        self._share = share
        self._clock = clock
        self._sleep = sleep
        self._slack = slack
        self._numbered = 0
        """Calls started so far, warm-up included: the next call's index for {{n}}."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.recorder: CallRecorder | None = None
        """The measured phase's recorder, once it has started (for progress)."""

    def stop(self) -> None:
        """End the run now (Ctrl-C): calls in flight are cancelled and not recorded."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()

    async def run(
        self, recorder: Callable[[float], CallRecorder] = CallRecorder
    ) -> tuple[CallRecorder, PhaseResult]:
        """Warm up, then run the measured part into `recorder(start time)`."""
        share = self._share
        if share.warmup > 0:
            await self._phase(_discard, self._clock(), None, share.warmup)
        start = self._clock()
        self.recorder = recorder(start)
        if self._stopped:
            return self.recorder, PhaseResult(0.0, 0.0, True)
        phase = await self._phase(self.recorder.record_many, start, share.total, share.duration)
        elapsed = self._clock() - start
        missed = 0 if self._stopped else self._missed(phase)
        return self.recorder, PhaseResult(elapsed, phase.max_lag, self._stopped, missed)

    def _missed(self, phase: _Phase) -> int:
        """Open model: slots due before the end of the duration that no call took."""
        share = self._share
        if share.rate is None or share.duration is None:
            return 0
        spacing, offset = share.workers / share.rate, share.index / share.rate
        slots = max(0, math.ceil((share.duration - offset) / spacing))
        while slots and phase.start + offset + (slots - 1) * spacing >= phase.stop_at:
            slots -= 1  # float rounding at the boundary
        return int(max(0, min(slots, phase.limit) - phase.issued))

    async def _phase(
        self, record: Record, start: float, total: int | None, duration: float | None
    ) -> _Phase:
        phase = _Phase(
            start,
            math.inf if total is None else total,
            math.inf if duration is None else start + duration,
            record,
        )
        loop = self._open if self._share.rate is not None else self._closed
        self._tasks = [asyncio.ensure_future(loop(phase)) for _ in range(self._share.concurrency)]
        try:
            outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in self._tasks:
                task.cancel()
            self._tasks = []
            phase.flush()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return phase

    def _requests(self, i: int) -> Sequence[bytes]:
        return self._template.render(self._share.call_number(i))

    async def _closed(self, phase: _Phase) -> None:
        clock, invoke, ended, flush = self._clock, self._invoke, phase.ended, phase.flush
        fixed = self._template.render(0) if self._template.constant else None
        while True:
            n = phase.issued
            start = clock()
            if n >= phase.limit or start >= phase.stop_at:
                return
            phase.issued = n + 1
            i = self._numbered
            self._numbered = i + 1
            if fixed is not None:
                requests = fixed
            else:  # rendering is the generator's work, not the call's
                requests = self._requests(i)
                start = clock()
            try:
                await invoke(requests)
            except aio.AioRpcError as exc:
                ended.append((start, clock() - start, exc.code().name, exc.details()))
            except Exception as exc:  # a client-side failure: counted, the run goes on
                ended.append((start, clock() - start, "UNKNOWN", f"{type(exc).__name__}: {exc}"))
            else:
                ended.append((start, clock() - start, "OK", None))
            if len(ended) >= RECORD_BATCH:
                flush()

    async def _open(self, phase: _Phase) -> None:
        clock, sleep, slack, invoke = self._clock, self._sleep, self._slack, self._invoke
        ended, flush = phase.ended, phase.flush
        share = self._share
        assert share.rate is not None
        spacing, offset = share.workers / share.rate, share.index / share.rate
        fixed = self._template.render(0) if self._template.constant else None
        while True:
            n = phase.issued
            due = phase.start + offset + n * spacing
            now = clock()
            if n >= phase.limit or due >= phase.stop_at or now >= phase.stop_at:
                return  # (a late call is not started once the duration is over: missed)
            phase.issued = n + 1
            i = self._numbered
            self._numbered = i + 1
            requests = fixed if fixed is not None else self._requests(i)
            if due - now > slack:
                await sleep(due - now - slack)
                now = clock()
            if now > due:
                if now - due > phase.max_lag:
                    phase.max_lag = now - due
                start = due
            else:
                start = now
            try:
                await invoke(requests)
            except aio.AioRpcError as exc:
                ended.append((start, clock() - start, exc.code().name, exc.details()))
            except Exception as exc:
                ended.append((start, clock() - start, "UNKNOWN", f"{type(exc).__name__}: {exc}"))
            else:
                ended.append((start, clock() - start, "OK", None))
            if len(ended) >= RECORD_BATCH:
                flush()
