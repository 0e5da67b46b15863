"""The live progress line of `meshctl load`: calls, rate, errors, p50 and p99 so far.

One line on stderr, rewritten in place each second, and only when stderr is a terminal: a log
file or a pipe gets nothing, so that the report on stdout and the logs stay clean. The
percentiles are those of every call so far, also across worker processes: each worker sends
its histogram and the parent adds them (meshctl/load/workers.py), as the final report does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol, TextIO


@dataclass(frozen=True, slots=True)
class Progress:
    """The run so far."""

    count: int
    errors: int
    p50: float
    """Seconds."""
    p99: float
    """Seconds."""


class ProgressSource(Protocol):
    def progress(self) -> Progress | None:
        """The run so far; None before the measured part has begun."""


class ProgressLine:
    """One status line on a terminal, rewritten in place: the rate is over the last interval."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = (0.0, 0)

    def show(self, elapsed: float, progress: Progress | None) -> None:
        if progress is None:  # starting workers, or warming up
            self._last = (elapsed, 0)
            text = f"{elapsed:6.1f}s  starting"
        else:
            since, before = self._last
            rate = (progress.count - before) / (elapsed - since) if elapsed > since else 0.0
            self._last = (elapsed, progress.count)
            text = (
                f"{elapsed:6.1f}s  {progress.count:>9,} calls  {rate:>8,.0f}/s  "
                f"errors {progress.errors:,}  p50 {progress.p50 * 1e3:.2f} ms  "
                f"p99 {progress.p99 * 1e3:.2f} ms"
            )
        self._stream.write(f"\r{text}\x1b[K")
        self._stream.flush()

    def clear(self) -> None:
        self._stream.write("\r\x1b[K")
        self._stream.flush()


async def show_progress(source: ProgressSource, line: ProgressLine, interval: float = 1.0) -> None:
    """Show `source`'s progress on `line` every `interval` seconds, until cancelled."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        line.show(time.monotonic() - started, source.progress())
