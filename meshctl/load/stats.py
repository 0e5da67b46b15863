"""What a load run records per call, and how records from several workers merge exactly.

Latencies go into an HDR histogram (Gil Tene's HdrHistogram, the `hdrhistogram` package), not
into a list or a running average:

- Fixed memory. The histogram covers 1 us to 1 hour at 3 significant digits (every value is
  kept within 0.1%: exact to the microsecond below 2 ms, within 1 ms at one second) in about
  24,000 counters (190 KB), whether the run makes a thousand calls or a billion.
- Exact merge. Worker processes each fill their own histogram; adding the counters gives the
  histogram of the whole run, so the merged p99 is the p99 of all calls, not an average of
  per-worker p99s (which is no percentile of anything).
- No averaging that hides stalls. Every call's latency is one count, so a stall that delays
  many calls shows up in the tail with its true weight. (The open model records each call's
  latency from its *scheduled* start, so calls queued behind a stall carry the time they
  waited: coordinated omission is avoided at the source, not corrected afterwards.)

Latencies are recorded in integer microseconds. One that does not fit (over an hour, or a
negative one, which only a broken clock gives; inf and nan count as over an hour) is recorded
at the nearest bound and counted in `clamped`: `record` never raises, it is on the hot path of
the load generator.

The timeline keeps (start offset, latency) of every call for the latency-over-time plot, until
it holds `TIMELINE_LIMIT` pairs (8 MB of float32). Then it thins itself: calls are numbered in
order of completion from 0, and the timeline keeps those whose number is a multiple of k;
k starts at 1 and doubles each time the timeline is full, dropping every other pair kept so
far. So memory stays bounded for a run of any length and the kept calls stay evenly spread
over it (one in k, for the smallest power of two k that fits).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
"""The histogram's resolution: 1 microsecond."""
HIGHEST_US = 3_600 * 1_000_000
"""The largest latency the histogram tracks: 1 hour, in microseconds."""
SIGNIFICANT_DIGITS = 3
"""Every recorded value is kept within 0.1%."""
TIMELINE_LIMIT = 1_000_000
"""Pairs a recorder's timeline holds before it thins itself (see module doc)."""


def new_histogram() -> HdrHistogram:
    """An empty latency histogram (microseconds, 1 us..1 h, 3 significant digits)."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def decode_histogram(encoded: bytes) -> HdrHistogram:
    """The histogram `encoded` (RecordedRun.histogram) holds."""
    return HdrHistogram.decode(encoded)


@dataclass
class RecordedRun:
    """A worker's (or the merged) record of a run: picklable, so it crosses processes.

    `histogram` is an hdrhistogram encoding (HdrHistogram.encode()) of latencies in
    microseconds; merging decodes and adds, so percentiles of the merge are exact to the
    histogram's precision, never averages of percentiles.
    """

    histogram: bytes
    status_counts: dict[str, int] = field(default_factory=dict)
    """Calls by final gRPC status code name ("OK", "UNAVAILABLE", ...)."""
    error_counts: dict[str, int] = field(default_factory=dict)
    """Failed calls by "CODE: details" text ("CODE" alone when there are no details)."""
    timeline: bytes = b""
    """(start offset s, latency s) of each recorded call as array('f') bytes, pairs in order
    of completion, for the latency-over-time plot. Thinned past TIMELINE_LIMIT pairs (see
    module doc); a merge holds each worker's pairs one worker after another."""
    clamped: int = 0
    """Calls whose latency was outside the histogram's range (over 1 hour, or negative) and
    was recorded at the nearest bound."""


Call = tuple[float, float, str, str | None]
"""An ended call: (start, latency s, status code name, details or None)."""


class _HistogramLayout:
    """Where hdrh's HdrHistogram counts a value, computed inline (see CallRecorder.record_many).

    hdrh (0.10) keeps `counts` and the layout parameters as plain attributes; `of` checks the
    inline index against hdrh's own for values across the whole range (every bucket's edges)
    and gives None, so the recorder uses hdrh's record_value, when they differ: a future hdrh
    with another layout is slower here, never wrong.
    """

    @staticmethod
    def of(histogram: HdrHistogram) -> tuple[int, int, int, int, int] | None:
        try:
            unit = int(histogram.unit_magnitude)
            half_magnitude = int(histogram.sub_bucket_half_count_magnitude)
            layout = (
                int(histogram.sub_bucket_mask),
                unit + half_magnitude + 1,
                unit,
                half_magnitude,
                int(histogram.sub_bucket_half_count),
            )
            index_of = histogram._counts_index_for
        except AttributeError:
            return None
        mask, bucket_base, _, _, half_count = layout
        probes = {0, 1, HIGHEST_US}
        for power in range(HIGHEST_US.bit_length() + 1):
            probes.update(edge for edge in (2**power - 1, 2**power, 2**power + 1))
        for value in sorted(v for v in probes if 0 <= v <= HIGHEST_US):
            bucket = (value | mask).bit_length() - bucket_base
            inline = ((bucket + 1) << half_magnitude) + (value >> (bucket + unit)) - half_count
            if inline != index_of(value):
                return None
        return layout


class CallRecorder:
    """Records calls on one worker's event loop; `record` is on the hot path and must stay
    cheap (no allocation beyond the histogram's and the timeline's)."""

    __slots__ = (
        "_clamped",
        "_count",
        "_errors",
        "_histogram",
        "_layout",
        "_started_at",
        "_statuses",
        "_stride_mask",
        "_timeline",
        "_timeline_floats",
    )

    def __init__(self, started_at: float, *, timeline_limit: int = TIMELINE_LIMIT) -> None:
        """`started_at`: the run's start on time.perf_counter(); timeline offsets are
        relative to it. `timeline_limit`: pairs the timeline holds before it thins (>= 2)."""
        if timeline_limit < 2:
            raise ValueError(f"timeline_limit must be at least 2, not {timeline_limit}")
        self._started_at = started_at
        self._histogram = new_histogram()
        self._layout = _HistogramLayout.of(self._histogram)
        self._statuses: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._count = 0
        self._clamped = 0
        self._timeline = array("f")
        self._timeline_floats = 2 * timeline_limit
        self._stride_mask = 0  # k - 1: the timeline keeps calls whose number k divides

    def record(self, start: float, latency: float, code: str, details: str | None = None) -> None:
        """One call that started at `start` (perf_counter seconds; for the open model, its
        scheduled start) and took `latency` seconds, ending with status `code`."""
        self.record_many(((start, latency, code, details),))

    def record_many(self, calls: Iterable[Call]) -> None:
        """Calls that ended, as (start, latency, code, details): what `record` does for each,
        in one loop (the load generator records its calls in batches, see meshctl/load/runner).

        The latency goes straight into the histogram's counters: hdrh's own record_value
        costs about 1 us a value in pure Python (four method calls and a bin() each), a
        share of a fast server's whole call; the same counts index computed inline costs a
        fraction of that. `_HistogramLayout` checks the inline index against hdrh's own."""
        histogram = self._histogram
        layout = self._layout
        if layout is None:  # an hdrh whose layout we do not know: its own, slower, path
            record_value = histogram.record_value
        else:
            counts = histogram.counts
            mask, bucket_base, unit, half_magnitude, half_count = layout
        lowest, highest = histogram.min_value, histogram.max_value
        statuses, errors = self._statuses, self._errors
        timeline, started_at, stride = self._timeline, self._started_at, self._stride_mask
        n = self._count
        for start, latency, code, details in calls:
            try:  # free unless it raises (Python 3.11+)
                us = int(latency * 1_000_000)
            except (OverflowError, ValueError):  # inf, nan
                us = HIGHEST_US + 1
            if not 0 <= us <= HIGHEST_US:
                us = HIGHEST_US if us > 0 else 0
                self._clamped += 1
            if layout is None:
                record_value(us)
            else:
                bucket = (us | mask).bit_length() - bucket_base
                counts[((bucket + 1) << half_magnitude) + (us >> (bucket + unit)) - half_count] += 1
                if us < lowest:
                    lowest = us
                if us > highest:
                    highest = us
            statuses[code] = statuses.get(code, 0) + 1
            if code != "OK":
                key = f"{code}: {details}" if details else code
                errors[key] = errors.get(key, 0) + 1
            if not n & stride:
                timeline.append(start - started_at)
                timeline.append(latency)
                if len(timeline) >= self._timeline_floats:
                    self._thin_timeline()
                    timeline, stride = self._timeline, self._stride_mask
            n += 1
        if layout is not None:
            histogram.total_count += n - self._count
            histogram.min_value, histogram.max_value = lowest, highest
        self._count = n

    def _thin_timeline(self) -> None:
        """Keep every other pair (those at even positions) and double k."""
        old = self._timeline
        kept = array("f", bytes(4 * 2 * ((len(old) // 2 + 1) // 2)))
        kept[0::2] = old[0::4]
        kept[1::2] = old[1::4]
        self._timeline = kept
        self._stride_mask = 2 * self._stride_mask + 1

    @property
    def count(self) -> int:
        """Calls recorded so far."""
        return self._count

    @property
    def errors(self) -> int:
        """Calls recorded so far that did not end OK."""
        return self._count - self._statuses.get("OK", 0)

    def percentile(self, q: float) -> float:
        """Latency in seconds at percentile `q` (0..100) of the calls so far (for progress)."""
        return latency_at(self._histogram, q)

    def encoded_histogram(self) -> bytes:
        """The latency histogram alone, encoded: what a worker's progress report needs,
        without the copy of the timeline that snapshot() makes."""
        return bytes(self._histogram.encode())

    def snapshot(self) -> RecordedRun:
        """What has been recorded, as a picklable value."""
        return RecordedRun(
            histogram=bytes(self._histogram.encode()),
            status_counts=dict(self._statuses),
            error_counts=dict(self._errors),
            timeline=self._timeline.tobytes(),
            clamped=self._clamped,
        )


def latency_at(histogram: HdrHistogram, q: float) -> float:
    """Latency in seconds at percentile `q` (0..100) of `histogram`."""
    return int(histogram.get_value_at_percentile(q)) / 1_000_000


def merged_histogram(encoded: Iterable[bytes]) -> HdrHistogram:
    """The sum of several encoded histograms: exact, not an average."""
    histogram = new_histogram()
    for part in map(decode_histogram, encoded):
        # hdrh's add() takes an empty histogram's minimum as 0: leave empty ones out.
        if part.get_total_count():
            histogram.add(part)
    return histogram


def merge(runs: list[RecordedRun]) -> RecordedRun:
    """The exact union of several workers' records."""
    histogram = merged_histogram(run.histogram for run in runs)
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for run in runs:
        for code, n in run.status_counts.items():
            statuses[code] = statuses.get(code, 0) + n
        for text, n in run.error_counts.items():
            errors[text] = errors.get(text, 0) + n
    return RecordedRun(
        histogram=bytes(histogram.encode()),
        status_counts=statuses,
        error_counts=errors,
        timeline=b"".join(run.timeline for run in runs),
        clamped=sum(run.clamped for run in runs),
    )
