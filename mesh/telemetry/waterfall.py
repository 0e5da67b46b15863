"""Recent traces as waterfalls in the terminal, read from the local receiver's store.

Where Jaeger runs, its UI shows traces; where it cannot, the local receiver
(`mesh/telemetry/receiver.py`) stores spans as JSON lines and this command draws the most
recent traces from them: one line per span, children under their parent, with the service,
span name, duration, status, the mesh's attempt/retry/hedge markers, and a bar placed on the
trace's time line, so a retry after a failed attempt or a slow hedge is visible at a glance.

    python -m mesh.telemetry.waterfall [--store PATH] [--last N] [--trace TRACE_ID] [--width COLS]

`render_trace` is a pure function of the spans, so the drawing is tested without a terminal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mesh.telemetry.receiver import SpanRecord, default_store, group_by_trace, read_store

DEFAULT_LAST = 5
_MIN_BAR = 10
_MAX_SERVICE = 16
_MAX_NAME = 48
_MIN_NAME = 12
_MAX_STATUS = 22
_BAR, _TRACK = "█", "·"
_RED, _GREEN, _YELLOW, _DIM, _RESET = "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True, slots=True)
class _Row:
    span: SpanRecord
    tree: str
    """Branch drawing before the name: "├─ ", "│  └─ ", ..."""


def render_trace(spans: Sequence[SpanRecord], width: int = 100, colour: bool = False) -> str:
    """Draw one trace as a waterfall no wider than `width` (when the columns fit at all).

    Spans are in tree order: children under their parent, by start time; spans whose parent
    is not among `spans` (not received yet, or dropped) are drawn at the root level.
    """
    if not spans:
        return ""
    rows = list(_tree_rows(spans))
    t0 = min(span.start_ns for span in spans)
    total = max(max(span.end_ns for span in spans) - t0, 1)

    services = [span.service_name or "?" for span in spans]
    durations = [f"{row.span.duration_ms:.2f} ms" for row in rows]
    statuses = [_status(row.span) for row in rows]
    markers = [_marker(row.span) for row in rows]
    service_w = min(max(map(len, services)), _MAX_SERVICE)
    duration_w = max(map(len, durations))
    status_w = min(max(map(len, statuses)), _MAX_STATUS, max(len("ERROR"), width // 5))
    marker_w = max(map(len, markers))
    fixed = service_w + duration_w + status_w + (marker_w + 1 if marker_w else 0) + 4 + 2
    # The bar is the point of a waterfall: names give way (down to a minimum) before it does.
    natural_name = max(len(row.tree) + len(row.span.name) for row in rows)
    bar_share = max(_MIN_BAR, width // 4)
    name_w = max(_MIN_NAME, min(natural_name, _MAX_NAME, width - fixed - bar_share))
    bar_w = max(_MIN_BAR, width - fixed - name_w)

    lines = [_fit(_header(spans, t0, total), width)]
    for row, duration, status, marker in zip(rows, durations, statuses, markers, strict=True):
        span = row.span
        cells = [
            _fit(span.service_name or "?", service_w).ljust(service_w),
            (row.tree + _fit_tail(span.name, name_w - len(row.tree))).ljust(name_w),
            duration.rjust(duration_w),
            _paint(_fit(status, status_w).ljust(status_w), _status_colour(span), colour),
        ]
        if marker_w:
            cells.append(_paint(marker.ljust(marker_w), _YELLOW if marker else "", colour))
        bar = _bar(span, t0, total, bar_w)
        cells.append("|" + _paint(bar, _RED if span.status_code == "ERROR" else "", colour) + "|")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _tree_rows(spans: Sequence[SpanRecord]) -> Iterator[_Row]:
    by_id = {span.span_id: span for span in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots = []
    # By start; on a tie, the enclosing (longer) span first.
    for span in sorted(spans, key=lambda s: (s.start_ns, -s.end_ns)):
        parent = span.parent_span_id
        if parent and parent != span.span_id and parent in by_id:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    seen: set[str] = set()

    def walk(span: SpanRecord, tree: str, indent: str) -> Iterator[_Row]:
        seen.add(span.span_id)
        yield _Row(span, tree)
        kids = [kid for kid in children.get(span.span_id, []) if kid.span_id not in seen]
        for index, kid in enumerate(kids):
            last = index == len(kids) - 1
            yield from walk(
                kid, indent + ("└─ " if last else "├─ "), indent + ("   " if last else "│  ")
            )

    for root in roots:
        yield from walk(root, "", "")
    # Spans only reachable through a parent cycle (malformed input) still get a line.
    for span in spans:
        if span.span_id not in seen:
            yield from walk(span, "", "")


def _header(spans: Sequence[SpanRecord], t0: int, total: int) -> str:
    roots = [span for span in spans if not span.parent_span_id] or list(spans)
    root = min(roots, key=lambda span: span.start_ns)
    started = datetime.fromtimestamp(t0 / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    count = f"{len(spans)} span" + ("" if len(spans) == 1 else "s")
    return (
        f"trace {root.trace_id}  {started}  {total / 1e6:.2f} ms  {count}  "
        f"{root.service_name or '?'} {root.name}"
    )


def _status(span: SpanRecord) -> str:
    if span.status_code == "ERROR":
        return f"ERROR {span.status_message}".strip()
    return "OK" if span.status_code == "OK" else "-"


def _status_colour(span: SpanRecord) -> str:
    return {"ERROR": _RED, "OK": _GREEN}.get(span.status_code, _DIM)


def _marker(span: SpanRecord) -> str:
    attributes = span.attributes
    parts = []
    if "mesh.attempt" in attributes:
        parts.append(f"attempt {attributes['mesh.attempt']}")
    if attributes.get("mesh.retry"):
        parts.append("retry")
    if attributes.get("mesh.hedge"):
        parts.append("hedge")
    return " ".join(parts)


def _bar(span: SpanRecord, t0: int, total: int, bar_w: int) -> str:
    start = min(int((span.start_ns - t0) / total * bar_w), bar_w - 1)
    end = min(max(-(-(span.end_ns - t0) * bar_w // total), start + 1), bar_w)
    return _TRACK * start + _BAR * (end - start) + _TRACK * (bar_w - end)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _fit_tail(text: str, width: int) -> str:
    """Cut from the front: a span name's end (the method) says the most."""
    return text if len(text) <= width else "…" + text[len(text) - max(width - 1, 0) :]


def _paint(text: str, code: str, colour: bool) -> str:
    return f"{code}{text}{_RESET}" if colour and code else text


def _root_start(spans: Sequence[SpanRecord]) -> int:
    roots = [span for span in spans if not span.parent_span_id] or spans
    return min(span.start_ns for span in roots)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.telemetry.waterfall",
        description="Show the most recent traces stored by python -m mesh.telemetry.receiver.",
    )
    parser.add_argument(
        "--store", type=Path, default=None, help=f"span store (default: {default_store()})"
    )
    parser.add_argument("--last", type=int, default=DEFAULT_LAST, help="how many traces")
    parser.add_argument("--trace", default=None, help="one trace, by id or id prefix")
    parser.add_argument("--width", type=int, default=None, help="columns (default: terminal)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    store: Path = args.store or default_store()
    try:
        spans = read_store(store)
    except FileNotFoundError:
        print(
            f"no trace store at {store}: start the local receiver "
            "(python -m mesh.telemetry.receiver) and export to the endpoint it prints",
            file=sys.stderr,
        )
        return 1
    traces = sorted(group_by_trace(spans).values(), key=_root_start)
    if args.trace:
        wanted = args.trace.lower()
        traces = [trace for trace in traces if trace[0].trace_id.startswith(wanted)]
        if not traces:
            print(f"no trace {args.trace} in {store}", file=sys.stderr)
            return 1
    if not traces:
        print(f"no traces in {store} yet", file=sys.stderr)
        return 0
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    shown = traces[-max(args.last, 1) :] if not args.trace else traces
    try:
        print("\n\n".join(render_trace(trace, width, colour) for trace in shown))
        sys.stdout.flush()
    except BrokenPipeError:
        # Piped into `head`: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
