"""Running a load plan: in this process, or split over worker processes whose records merge.

Why processes: one Python process drives one event loop on one core, and at a few thousand
calls per second that core is the limit, not the server. `--workers K` starts K processes,
each with its own event loop and channel, doing an exact share of the run
(meshctl/load/runner.py), and merges their HDR histograms and counts exactly
(meshctl/load/stats.py).
With one worker the calls run in this process: a child would only add its start-up time.

The processes are started fresh (`python -m meshctl.load.workers`, never fork(): forking a
process that has gRPC loaded can crash it, see scripts/die_with_parent.py), each in its own
session so that Ctrl-C reaches only the parent, which stops them in order. They talk over
their stdin and stdout (length-prefixed pickles; a child's stray prints go to stderr):

    parent -> child   (CallSpec, WorkerShare, progress interval)   then "go" or "stop"
    child -> parent   ("ready",) or ("error", message)             after preparing
                      ("progress", count, errors, histogram)       each interval, if asked
                      ("done", RecordedRun, PhaseResult)           at the end

Every child prepares on its own (connects, finds the method, checks the body) and says ready;
only when all are ready does the parent say "go", so that they start together and a bad input
found by any of them sends no call at all. A child whose stdin closes (the parent died, even
by SIGKILL) stops at once: no worker outlives its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from meshctl.load.errors import BadInput
from meshctl.load.progress import Progress
from meshctl.load.runner import CallLoop, PhaseResult, WorkerShare, invoker
from meshctl.load.stats import CallRecorder, RecordedRun, latency_at, merge, merged_histogram
from meshctl.load.target import CallSpec, Prepared, prepare

PROGRESS_INTERVAL = 0.5
"""Seconds between a worker's progress messages (twice per progress line: fresher counts)."""
_HEADER = struct.Struct(">I")


class WorkerFailed(RuntimeError):
    """A worker process died, or did not get ready in time: not the user's input."""


@dataclass(frozen=True, slots=True)
class FinishedRun:
    """A finished (or interrupted) run: the merged record, and how the run went (its length,
    schedule lag, missed calls: the longest, largest and sum over the workers)."""

    run: RecordedRun
    phase: PhaseResult


class LoadRun(Protocol):
    """A run in progress, wherever its calls are made."""

    async def run(self) -> FinishedRun: ...

    def stop(self) -> None:
        """End the run early (Ctrl-C); run() then returns what was recorded."""

    def progress(self) -> Progress | None:
        """The run so far; None before the measured part has begun."""

    async def close(self) -> None: ...


class InProcessRun:
    """One worker's calls on this process's event loop."""

    def __init__(self, prepared: Prepared, share: WorkerShare, spec: CallSpec) -> None:
        self._prepared = prepared
        invoke = invoker(prepared.connection.channel, prepared.method, share.timeout, spec.metadata)
        self._loop = CallLoop(invoke, prepared.template, share)

    async def run(self) -> FinishedRun:
        recorder, phase = await self._loop.run()
        return FinishedRun(recorder.snapshot(), phase)

    def stop(self) -> None:
        self._loop.stop()

    @property
    def recorder(self) -> CallRecorder | None:
        """The measured part's recorder, once it has begun."""
        return self._loop.recorder

    def progress(self) -> Progress | None:
        recorder = self._loop.recorder
        if recorder is None or not recorder.count:
            return None
        return Progress(
            recorder.count, recorder.errors, recorder.percentile(50), recorder.percentile(99)
        )

    async def close(self) -> None:
        await self._prepared.close()


class WorkerPool:
    """K worker processes, one share of the run each."""

    def __init__(
        self, spec: CallSpec, shares: Sequence[WorkerShare], *, report_progress: bool = False
    ) -> None:
        self._spec = spec
        self._shares = list(shares)
        self._interval = PROGRESS_INTERVAL if report_progress else None
        self._procs: list[asyncio.subprocess.Process] = []
        self._latest: dict[int, tuple[int, int, bytes]] = {}
        """Each worker's last progress report: calls, errors, encoded histogram."""
        self._stopped = False

    async def start(self, timeout: float) -> None:
        """Start every worker and wait until each has prepared; BadInput (after stopping
        them all, before any call) when one finds bad input."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        for w, share in enumerate(self._shares):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "meshctl.load.workers",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            self._procs.append(proc)
            _send(self._stdin(w), (self._spec, share, self._interval))
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(self._receive(w) for w in range(len(self._procs)))), timeout
            )
        except TimeoutError:
            raise WorkerFailed(f"the workers were not ready within {timeout:g} s") from None
        for answer in answers:
            if answer[0] == "error":
                raise BadInput(answer[1])

    async def run(self) -> FinishedRun:
        for w in range(len(self._procs)):
            _send(self._stdin(w), "go")
        results = await asyncio.gather(*(self._collect(w) for w in range(len(self._procs))))
        return FinishedRun(
            merge([run for run, _ in results]),
            PhaseResult.combined([phase for _, phase in results]),
        )

    async def _collect(self, w: int) -> tuple[RecordedRun, PhaseResult]:
        while True:
            message = await self._receive(w)
            if message[0] == "progress":
                self._latest[w] = message[1:]
            elif message[0] == "done":
                return message[1], message[2]

    async def _receive(self, w: int) -> Any:
        proc = self._procs[w]
        assert proc.stdout is not None
        try:
            header = await proc.stdout.readexactly(_HEADER.size)
            return pickle.loads(await proc.stdout.readexactly(_HEADER.unpack(header)[0]))
        except asyncio.IncompleteReadError:
            code = await proc.wait()
            raise WorkerFailed(
                f"worker {w} exited with code {code} (see its messages above)"
            ) from None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for w in range(len(self._procs)):
            with contextlib.suppress(OSError):
                _send(self._stdin(w), "stop")

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (for CPU accounting)."""
        return [proc.pid for proc in self._procs]

    def _stdin(self, w: int) -> asyncio.StreamWriter:
        stdin = self._procs[w].stdin
        assert stdin is not None
        return stdin

    def progress(self) -> Progress | None:
        """The workers' last reports added up; their histograms merged, so the percentiles
        are those of all calls so far (about 0.3 ms per worker, once a second)."""
        latest = list(self._latest.values())
        count = sum(calls for calls, _, _ in latest)
        if not count:
            return None
        histogram = merged_histogram(encoded for _, _, encoded in latest)
        return Progress(
            count,
            sum(errors for _, errors, _ in latest),
            latency_at(histogram, 50),
            latency_at(histogram, 99),
        )

    async def close(self, timeout: float = 5.0) -> None:
        """Let the workers exit (closing their stdin tells them to), kill the late ones."""
        for proc in self._procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


def _send(out: asyncio.StreamWriter | IO[bytes], message: object) -> None:
    """Write one message (to a child's stdin, or a child's channel to us)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(payload)) + payload)


# -- the worker process ---------------------------------------------------------------------


async def _read(reader: asyncio.StreamReader) -> Any:
    """The parent's next message; "stop" when it has closed our stdin."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
    except asyncio.IncompleteReadError:
        return "stop"


async def _worker(out: IO[bytes]) -> None:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec, share, interval = await _read(reader)
    try:
        prepared = await prepare(spec, share.index)
    except BadInput as exc:
        _emit(out, ("error", str(exc)))
        return
    try:
        run = InProcessRun(prepared, share, spec)
        _emit(out, ("ready",))
        if await _read(reader) != "go":
            return
        helpers = [asyncio.ensure_future(_stop_when_told(reader, run))]
        if interval is not None:
            helpers.append(asyncio.ensure_future(_report(out, run, interval)))
        try:
            outcome = await run.run()
        finally:
            for helper in helpers:
                helper.cancel()
        _emit(out, ("done", outcome.run, outcome.phase))
    finally:
        await prepared.close()


async def _stop_when_told(reader: asyncio.StreamReader, run: InProcessRun) -> None:
    while await _read(reader) != "stop":
        pass
    run.stop()


async def _report(out: IO[bytes], run: InProcessRun, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        recorder = run.recorder
        if recorder is not None and recorder.count:
            _emit(out, ("progress", recorder.count, recorder.errors, recorder.encoded_histogram()))


def _emit(out: IO[bytes], message: object) -> None:
    _send(out, message)
    out.flush()


def main() -> None:
    """A worker process: prepare, wait for "go", run, send the record (see module doc)."""
    out = os.fdopen(os.dup(1), "wb")  # the parent's channel; fd 1 becomes stderr
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent says when to stop
    try:
        asyncio.run(_worker(out))
    except BrokenPipeError:  # the parent is gone
        pass


if __name__ == "__main__":
    main()
