"""The report of a load run, as ghz gives it: summary, histogram, percentiles, statuses, errors.

`build_report` computes everything once from the merged RecordedRun; the formats only print
the Report. Latencies come from the HDR histogram (see stats.py): exact to its 0.1%, with
slowest and fastest at the edges of their histogram buckets.

Formats (`render`):

- "summary": ghz's text layout (Summary, Response time histogram, Latency distribution,
  Status code distribution, Error distribution), under a header that says what was loaded
  and how. Latencies in milliseconds, with 3 decimals below 1 ms and 2 above.
- "json": one object. Units: every time-valued key ends in its unit, `_s` for the run's
  duration (`total_s`), `_ms` for latencies (`average_ms`, `latency_ms`, `le_ms`); rates are
  per second (`rps`, `rate_per_s`, null for the closed model).
- "csv": ghz's CSV has one row per call; ours is the summary as a two-column table,
  `metric,value`, one metric a row, with the same names and units as the JSON keys, then
  `p<q>_ms` per percentile, `histogram_le_ms:<bound>`, `status:<CODE>` and `error:<text>`
  counts: it pastes into a spreadsheet and stays comparable across runs row by row.

The histogram has `BUCKETS` buckets of equal width from fastest to slowest, each labelled by
its upper bound (the first one includes the fastest). ghz prints one more line first, the
calls exactly as fast as the fastest (almost always 1); an HDR bucket holds a range of values,
so we leave it out. Counts per bucket are exact: each HDR bucket's count goes to the linear
bucket holding the HDR bucket's upper bound.

`plot` draws latency over time (the calls kept in the timeline, with p50 and p99 per second,
or per a shorter round step for a run under 20 s) and the latency distribution as HdrHistogram
plots it: latency against percentile on a log scale of 1/(1 - q), so that 90%, 99%, 99.9% are
evenly spaced and the tail is visible.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdrh.histogram import HdrHistogram

from meshctl.load.errors import BadInput
from meshctl.load.stats import RecordedRun, decode_histogram

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
BUCKETS = 10
"""Linear buckets in the response time histogram."""
BAR = "∎"
BAR_WIDTH = 40
"""Characters of the longest histogram bar (ghz's)."""
LABELLED = (50.0, 90.0, 99.0, 99.9)
"""Percentiles named on the distribution plot (all of PERCENTILES get a dot; the low ones
crowd together at the left)."""
BIN_WIDTHS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
"""Seconds per point of the p50/p99 lines over time, widest first (see _plot_over_time)."""
MAX_DOTS = 50_000
"""Calls drawn in the latency-over-time scatter; more would only blacken it (and slow it)."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """How the run was made: printed in the report's header and kept in JSON/CSV."""

    target: str
    """The Consul service name or host:port."""
    method: str
    """The full method path."""
    concurrency: int
    workers: int
    rate: float | None
    """Calls per second started on schedule (open model), or None (closed model)."""
    elapsed: float
    """Seconds of the measured part of the run (warm-up excluded)."""
    max_lag: float = 0.0
    """Open model: the most a call started behind its schedule, seconds."""
    missed: int = 0
    """Open model: calls due before the end of the duration that were never started (the
    server or the concurrency cap could not keep up; their latency is missing from the tail)."""


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the formats print, computed once from a merged RecordedRun (seconds)."""

    info: RunInfo
    count: int
    total: float
    slowest: float
    fastest: float
    average: float
    rps: float
    percentiles: tuple[tuple[float, float], ...]
    """(percentile, latency s) for PERCENTILES."""
    histogram: tuple[tuple[float, int, float], ...]
    """(bucket upper bound s, count, share 0..1), ~10 linear buckets fastest..slowest, as ghz."""
    status_counts: dict[str, int]
    error_counts: dict[str, int]
    clamped: int = 0
    """Calls outside the histogram's range (over 1 hour, or negative), counted at its bound."""


def build_report(info: RunInfo, run: RecordedRun) -> Report:
    """The report of `run`; a run without calls gives zeros, not an error."""
    histogram = decode_histogram(run.histogram)
    count = int(histogram.get_total_count())
    if count:
        fastest_us = int(histogram.get_min_value())
        slowest_us = int(histogram.get_max_value())
        average = float(histogram.get_mean_value()) / 1_000_000
        at = histogram.get_percentile_to_value_dict(list(PERCENTILES))
        percentiles = tuple((q, int(at[q]) / 1_000_000) for q in PERCENTILES)
        buckets = _linear_buckets(histogram, fastest_us, slowest_us, count)
    else:
        fastest_us = slowest_us = 0
        average = 0.0
        percentiles = tuple((q, 0.0) for q in PERCENTILES)
        buckets = ()
    return Report(
        info=info,
        count=count,
        total=info.elapsed,
        slowest=slowest_us / 1_000_000,
        fastest=fastest_us / 1_000_000,
        average=average,
        rps=count / info.elapsed if info.elapsed > 0 else 0.0,
        percentiles=percentiles,
        histogram=buckets,
        status_counts=_by_count(run.status_counts),
        error_counts=_by_count(run.error_counts),
        clamped=run.clamped,
    )


def _linear_buckets(
    histogram: HdrHistogram, fastest_us: int, slowest_us: int, count: int
) -> tuple[tuple[float, int, float], ...]:
    if slowest_us == fastest_us:
        return ((slowest_us / 1_000_000, count, 1.0),)
    width = (slowest_us - fastest_us) / BUCKETS
    counts = [0] * BUCKETS
    for step in histogram.get_recorded_iterator():
        index = math.ceil((step.value_iterated_to - fastest_us) / width) - 1
        counts[min(max(index, 0), BUCKETS - 1)] += step.count_at_value_iterated_to
    bounds = [fastest_us + width * (i + 1) for i in range(BUCKETS - 1)] + [slowest_us]
    return tuple((bound / 1_000_000, n, n / count) for bound, n in zip(bounds, counts, strict=True))


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    """Most frequent first; ties in name order, so that output is stable."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def render(report: Report, fmt: str) -> str:
    """`fmt` is "summary" (ghz-like text with histogram bars), "json" or "csv"."""
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise BadInput(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    return renderer(report)


def _summary(report: Report) -> str:
    info = report.info
    rate = "unlimited (closed model)" if info.rate is None else f"{info.rate:g}/s (open model)"
    header = [
        ("Target:", info.target),
        ("Method:", info.method),
        ("Concurrency:", str(info.concurrency)),
        ("Workers:", str(info.workers)),
        ("Rate:", rate),
    ]
    if info.rate is not None:
        header += [
            ("Schedule:", f"calls started up to {_ms_text(info.max_lag)} behind it"),
            ("Missed:", f"{info.missed} calls due but never started"),
        ]
    lines = _aligned("", header)
    summary = [
        ("Count:", str(report.count)),
        ("Total:", f"{report.total:.2f} s"),
        ("Slowest:", _ms_text(report.slowest)),
        ("Fastest:", _ms_text(report.fastest)),
        ("Average:", _ms_text(report.average)),
        ("Requests/sec:", f"{report.rps:.2f}"),
    ]
    if report.clamped:
        summary.append(("Clamped:", f"{report.clamped} calls outside 0..1 h, counted at the bound"))
    lines += ["", "Summary:", *_aligned("  ", summary)]
    if report.histogram:
        lines += ["", "Response time histogram:", *_bars(report.histogram)]
    if report.count:
        lines += ["", "Latency distribution:"]
        lines += [f"  {q:g} % in {_ms_text(latency)}" for q, latency in report.percentiles]
    if report.status_counts:
        statuses = [(f"[{code}]", f"{n} responses") for code, n in report.status_counts.items()]
        lines += ["", "Status code distribution:", *_aligned("  ", statuses)]
    if report.error_counts:
        errors = [(f"[{n}]", text) for text, n in report.error_counts.items()]
        lines += ["", "Error distribution:", *_aligned("  ", errors)]
    return "\n".join(lines) + "\n"


def _aligned(indent: str, rows: Iterable[tuple[str, str]]) -> list[str]:
    """`label  value` lines with the values in one column."""
    rows = list(rows)
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label.ljust(width)}  {value}" for label, value in rows]


def _bars(buckets: tuple[tuple[float, int, float], ...]) -> list[str]:
    """ghz's histogram lines: `  <bound ms> [<count>] |∎∎∎`, the largest bucket BAR_WIDTH."""
    marks = [f"{bound * 1000:.3f}" for bound, _, _ in buckets]
    counts = [f"[{n}]" for _, n, _ in buckets]
    mark_width = max(map(len, marks))
    count_width = max(map(len, counts))
    peak = max(n for _, n, _ in buckets)
    return [
        f"  {mark.rjust(mark_width)} {n_text.ljust(count_width)} |"
        + BAR * ((n * BAR_WIDTH + peak // 2) // peak if peak else 0)
        for mark, n_text, (_, n, _) in zip(marks, counts, buckets, strict=True)
    ]


def _ms_text(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms"


def _ms(seconds: float) -> float:
    """Milliseconds to the microsecond (the histogram's resolution)."""
    return round(seconds * 1000, 3)


def _fields(report: Report) -> dict[str, Any]:
    """The scalar fields, named as in JSON and CSV."""
    info = report.info
    return {
        "target": info.target,
        "method": info.method,
        "concurrency": info.concurrency,
        "workers": info.workers,
        "rate_per_s": info.rate,
        "max_lag_ms": _ms(info.max_lag),
        "missed": info.missed,
        "count": report.count,
        "total_s": info.elapsed,
        "rps": round(report.rps, 3),
        "slowest_ms": _ms(report.slowest),
        "fastest_ms": _ms(report.fastest),
        "average_ms": _ms(report.average),
        "clamped": report.clamped,
    }


def _json(report: Report) -> str:
    document = _fields(report) | {
        "latency_distribution": [
            {"percentile": q, "latency_ms": _ms(latency)} for q, latency in report.percentiles
        ],
        "histogram": [
            {"le_ms": _ms(bound), "count": n, "share": share}
            for bound, n, share in report.histogram
        ],
        "status_counts": report.status_counts,
        "error_counts": report.error_counts,
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _csv(report: Report) -> str:
    rows: list[tuple[str, Any]] = list(_fields(report).items())
    rows += [(f"p{q:g}_ms", _ms(latency)) for q, latency in report.percentiles]
    rows += [(f"histogram_le_ms:{_ms(bound)}", n) for bound, n, _ in report.histogram]
    rows += [(f"status:{code}", n) for code, n in report.status_counts.items()]
    rows += [(f"error:{text}", n) for text, n in report.error_counts.items()]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("metric", "value"))
    writer.writerows(rows)
    return out.getvalue()


_RENDERERS: dict[str, Callable[[Report], str]] = {
    "summary": _summary,
    "json": _json,
    "csv": _csv,
}
FORMATS = tuple(_RENDERERS)
"""The formats `render` knows, for the command line's choices."""


def plot(report: Report, run: RecordedRun, path: Path) -> None:
    """Latency over time and the latency distribution, to a PNG at `path` (matplotlib, an
    optional extra: BadInput saying how to install it when it is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise BadInput("--plot needs matplotlib: pip install 'foodmesh[plot]'") from e
    # A Figure on its own Agg canvas, not pyplot: no global backend, no window, no state.
    figure = Figure(figsize=(10, 9), layout="constrained")
    FigureCanvasAgg(figure)
    info = report.info
    figure.suptitle(
        f"{info.method} on {info.target}\n"
        f"{report.count} calls in {report.total:.1f} s ({report.rps:.0f}/s), "
        f"concurrency {info.concurrency}, {info.workers} worker(s)"
    )
    _plot_over_time(figure.add_subplot(2, 1, 1), report, run.timeline)
    _plot_distribution(figure.add_subplot(2, 1, 2), report, decode_histogram(run.histogram))
    figure.savefig(path, format="png", dpi=100)


def _plot_over_time(axes: Axes, report: Report, timeline: bytes) -> None:
    import numpy as np

    axes.set_title("Latency over time")
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("latency (ms)")
    pairs = np.frombuffer(timeline, dtype=np.float32).reshape(-1, 2).astype(np.float64)
    if not len(pairs):
        _no_calls(axes)
        return
    offsets, latencies = pairs[:, 0], pairs[:, 1] * 1000
    step = max(1, len(pairs) // MAX_DOTS)
    axes.scatter(
        offsets[::step],
        latencies[::step],
        s=4,
        alpha=0.3,
        linewidths=0,
        rasterized=True,
        label="calls" if step == 1 else f"calls (1 in {step} shown)",
    )
    # p50 and p99 per bin: per second, or per the widest round step that gives a short run
    # 20 bins. A last bin the run covers less than half of holds too few calls for a p99.
    last = float(offsets.max())
    span = last - float(offsets.min())
    width = next((w for w in BIN_WIDTHS if span / w >= 20), BIN_WIDTHS[-1])
    bins = np.floor(offsets / width).astype(np.int64)
    order = np.lexsort((latencies, bins))
    bins, latencies = bins[order], latencies[order]
    starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
    if (bins[starts[-1]] + 0.5) * width > last and len(starts) > 1:
        bins, latencies = bins[: starts[-1]], latencies[: starts[-1]]
        starts = starts[:-1]
    sizes = np.diff(np.r_[starts, len(bins)])
    middles = (bins[starts] + 0.5) * width
    per = "second" if width == 1.0 else f"{width:g} s"
    for q, color in ((50, "tab:green"), (99, "tab:red")):
        ranks = np.maximum(np.ceil(q / 100 * sizes).astype(np.int64) - 1, 0)
        axes.plot(middles, latencies[starts + ranks], color=color, label=f"p{q} per {per}")
    p50 = dict(report.percentiles).get(50.0, 0.0)
    if p50 > 0 and report.slowest > 20 * p50:
        axes.set_yscale("log")
    axes.legend(loc="upper right")
    axes.grid(alpha=0.3)


def _plot_distribution(axes: Axes, report: Report, histogram: HdrHistogram) -> None:
    axes.set_title("Latency by percentile")
    axes.set_xlabel("percentile")
    axes.set_ylabel("latency (ms)")
    if not report.count:
        _no_calls(axes)
        return
    xs: list[float] = []
    ys: list[float] = []
    for step in histogram.get_percentile_iterator(5):
        level = float(step.percentile_level_iterated_to)
        if level >= 100:
            break
        xs.append(1 / (1 - level / 100))
        ys.append(step.value_iterated_to / 1000)
    axes.plot(xs, ys, color="tab:blue", label="latency at percentile")
    for q, latency in report.percentiles:
        x = 1 / (1 - q / 100)
        axes.plot(x, latency * 1000, "o", color="tab:orange")
        if q not in LABELLED:
            continue
        axes.annotate(
            f"p{q:g} {_ms_text(latency)}",
            (x, latency * 1000),
            textcoords="offset points",
            xytext=(-4, 6),
            ha="right",
            fontsize=8,
        )
    axes.axhline(report.slowest * 1000, linestyle="--", color="grey", label="slowest")
    axes.set_xscale("log")
    decades = max(3, math.ceil(math.log10(max(xs, default=1.0))))
    ticks = [1.0, 2.0] + [10.0**d for d in range(1, decades + 1)]
    axes.set_xticks(ticks, [f"{100 * (1 - 1 / t):g}%" for t in ticks])
    axes.set_xlim(1, ticks[-1] * 1.2)
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)


def _no_calls(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no calls recorded", ha="center", va="center", transform=axes.transAxes)
