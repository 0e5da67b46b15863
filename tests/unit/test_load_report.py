"""The report of a load run: figures computed from a RecordedRun, and each output format
(ghz-like summary, JSON, CSV, PNG plot) read back."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest

from meshctl.load.errors import BadInput
from meshctl.load.report import (
    BAR,
    BAR_WIDTH,
    PERCENTILES,
    Report,
    RunInfo,
    build_report,
    plot,
    render,
)
from meshctl.load.stats import CallRecorder, RecordedRun, merge

T0 = 1000.0
METHOD = "/foodmesh.orders.v1.OrderService/PlaceOrder"
CLOSED = RunInfo("orders", METHOD, concurrency=32, workers=2, rate=None, elapsed=10.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_of(
    latencies_us: list[int], failures: dict[tuple[str, str], int] | None = None
) -> RecordedRun:
    """OK calls with these latencies, one every 10 ms, then failures of 1 ms each."""
    recorder = CallRecorder(T0)
    for i, us in enumerate(latencies_us):
        recorder.record(T0 + i / 100, us / 1_000_000, "OK")
    for (code, details), n in (failures or {}).items():
        for _ in range(n):
            recorder.record(T0, 0.001, code, details)
    return recorder.snapshot()


@pytest.fixture
def report() -> Report:
    """10,000 calls, 1..10,000 us; 5 of them UNAVAILABLE and 2 DEADLINE_EXCEEDED."""
    failures = {("UNAVAILABLE", "connection refused"): 5, ("DEADLINE_EXCEEDED", "late"): 2}
    return build_report(CLOSED, run_of(list(range(1, 9_994)), failures))


def test_the_summary_figures_come_from_the_histogram(report: Report) -> None:
    assert report.count == 10_000
    assert report.total == 10.0
    assert report.rps == 1000.0
    assert report.fastest == 0.000001
    assert report.slowest == pytest.approx(0.009993, rel=0.001)
    assert report.average == pytest.approx(0.004994, rel=0.001)
    assert [q for q, _ in report.percentiles] == list(PERCENTILES)
    # nearest rank: the 5,000th call of 1..999 us, 8 calls of 1000 us (7 failed), 1001.. us
    at = dict(report.percentiles)
    assert at[50.0] == pytest.approx(0.004993, rel=0.001)
    assert at[99.0] == pytest.approx(0.009893, rel=0.001)
    assert at[99.9] == pytest.approx(0.009983, rel=0.001)


def test_statuses_and_errors_are_listed_most_frequent_first(report: Report) -> None:
    assert list(report.status_counts.items()) == [
        ("OK", 9_993),
        ("UNAVAILABLE", 5),
        ("DEADLINE_EXCEEDED", 2),
    ]
    assert list(report.error_counts.items()) == [
        ("UNAVAILABLE: connection refused", 5),
        ("DEADLINE_EXCEEDED: late", 2),
    ]


def test_the_histogram_has_ten_linear_buckets_fastest_to_slowest_with_exact_counts() -> None:
    # below 2 ms the HDR histogram is exact, so every bucket's count is known
    report = build_report(CLOSED, run_of([100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100]))
    bounds = [bound for bound, _, _ in report.histogram]
    assert bounds == pytest.approx([i / 10_000 for i in range(2, 12)])
    # the first bucket holds the fastest too; each other one (lower, upper]
    assert [n for _, n, _ in report.histogram] == [2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert [share for _, _, share in report.histogram] == pytest.approx([2 / 11] + [1 / 11] * 9)


def test_histogram_counts_add_up_to_every_call(report: Report) -> None:
    assert len(report.histogram) == 10
    assert sum(n for _, n, _ in report.histogram) == report.count
    assert sum(share for _, _, share in report.histogram) == pytest.approx(1.0)
    assert report.histogram[-1][0] == report.slowest
    # uniform latencies: about a tenth in each bucket
    assert all(n == pytest.approx(1000, abs=15) for _, n, _ in report.histogram)


def test_calls_all_equally_fast_make_one_bucket() -> None:
    report = build_report(CLOSED, run_of([1234] * 7))
    assert report.histogram == ((0.001234, 7, 1.0),)
    assert render(report, "summary")  # and nothing divides by zero


def test_a_run_without_calls_reports_zeros_in_every_format(tmp_path: Path) -> None:
    empty = merge([])
    report = build_report(CLOSED, empty)
    assert (report.count, report.slowest, report.fastest, report.average, report.rps) == (
        0,
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert report.percentiles == tuple((q, 0.0) for q in PERCENTILES)
    assert report.histogram == ()
    assert "  Count:         0\n" in render(report, "summary")
    assert json.loads(render(report, "json"))["count"] == 0
    assert metrics_of(render(report, "csv"))["count"] == "0"
    plot(report, empty, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def test_zero_elapsed_time_gives_zero_rps_not_an_error() -> None:
    info = RunInfo("orders", METHOD, concurrency=1, workers=1, rate=None, elapsed=0.0)
    assert build_report(info, run_of([1000])).rps == 0.0


def test_the_summary_reads_like_ghz(report: Report) -> None:
    text = render(report, "summary")
    assert text.startswith(
        "Target:       orders\n"
        f"Method:       {METHOD}\n"
        "Concurrency:  32\n"
        "Workers:      2\n"
        "Rate:         unlimited (closed model)\n"
        "\n"
        "Summary:\n"
        "  Count:         10000\n"
        "  Total:         10.00 s\n"
        "  Slowest:       10.00 ms\n"
        "  Fastest:       0.001 ms\n"
        "  Average:       4.99 ms\n"
        "  Requests/sec:  1000.00\n"
        "\n"
        "Response time histogram:\n"
    )
    histogram = text.split("Response time histogram:\n")[1].split("\n\n")[0].splitlines()
    assert len(histogram) == 10
    assert histogram[0].startswith("  1.001 [1008] |")
    assert histogram[-1].startswith("  9.999 [994]  |")
    assert max(line.count(BAR) for line in histogram) == BAR_WIDTH
    assert len({line.index("|") for line in histogram}) == 1  # bars start in one column
    assert (
        "Latency distribution:\n  10 % in 1.00 ms\n  25 % in 2.49 ms\n  50 % in 5.00 ms\n"
    ) in text
    assert "  99.9 % in 9.98 ms\n" in text
    assert text.endswith(
        "Status code distribution:\n"
        "  [OK]                 9993 responses\n"
        "  [UNAVAILABLE]        5 responses\n"
        "  [DEADLINE_EXCEEDED]  2 responses\n"
        "\n"
        "Error distribution:\n"
        "  [5]  UNAVAILABLE: connection refused\n"
        "  [2]  DEADLINE_EXCEEDED: late\n"
    )


def test_the_summary_names_the_open_model_rate_and_clamped_calls() -> None:
    recorder = CallRecorder(T0)
    recorder.record(T0, 0.0005, "OK")
    recorder.record(T0, 5 * 3600.0, "OK")
    info = RunInfo(
        "127.0.0.1:50051", METHOD, concurrency=8, workers=1, rate=250.0, elapsed=2.0,
        max_lag=0.0123, missed=3,
    )  # fmt: skip
    report = build_report(info, recorder.snapshot())
    text = render(report, "summary")
    assert "Rate:         250/s (open model)\n" in text
    assert "Schedule:     calls started up to 12.30 ms behind it\n" in text
    assert "Missed:       3 calls due but never started\n" in text
    document = json.loads(render(report, "json"))
    assert (document["max_lag_ms"], document["missed"]) == (12.3, 3)
    assert "  Clamped:       1 calls outside 0..1 h, counted at the bound\n" in text
    assert "  Fastest:       0.500 ms\n" in text
    assert "Error distribution" not in text
    assert "Schedule:" not in render(build_report(CLOSED, recorder.snapshot()), "summary")


def test_json_holds_every_figure_with_units_in_the_keys(report: Report) -> None:
    document = json.loads(render(report, "json"))
    assert document["target"] == "orders"
    assert document["method"] == METHOD
    assert (document["concurrency"], document["workers"], document["rate_per_s"]) == (32, 2, None)
    assert (document["count"], document["total_s"], document["rps"]) == (10_000, 10.0, 1000.0)
    assert document["fastest_ms"] == 0.001
    assert document["slowest_ms"] == 9.999
    assert document["average_ms"] == pytest.approx(4.994, rel=0.001)
    assert document["clamped"] == 0
    distribution = {
        row["percentile"]: row["latency_ms"] for row in document["latency_distribution"]
    }
    assert list(distribution) == list(PERCENTILES)
    assert distribution[50.0] == pytest.approx(4.993, rel=0.001)
    assert [row["count"] for row in document["histogram"]] == [n for _, n, _ in report.histogram]
    assert document["histogram"][-1]["le_ms"] == document["slowest_ms"]
    assert document["status_counts"] == {"OK": 9_993, "UNAVAILABLE": 5, "DEADLINE_EXCEEDED": 2}
    assert document["error_counts"] == {
        "UNAVAILABLE: connection refused": 5,
        "DEADLINE_EXCEEDED: late": 2,
    }


def metrics_of(text: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["metric", "value"]
    assert all(len(row) == 2 for row in rows)
    return dict((metric, value) for metric, value in rows[1:])


def test_csv_is_a_metric_value_table(report: Report) -> None:
    metrics = metrics_of(render(report, "csv"))
    assert metrics["target"] == "orders"
    assert metrics["method"] == METHOD
    assert metrics["rate_per_s"] == ""
    assert int(metrics["count"]) == 10_000
    assert float(metrics["total_s"]) == 10.0
    assert float(metrics["rps"]) == 1000.0
    assert float(metrics["fastest_ms"]) == 0.001
    assert float(metrics["p50_ms"]) == pytest.approx(4.993, rel=0.001)
    assert float(metrics["p99.9_ms"]) == pytest.approx(9.983, rel=0.001)
    assert [metric for metric in metrics if metric.startswith("p")] == [
        f"p{q:g}_ms" for q in PERCENTILES
    ]
    buckets = [int(v) for metric, v in metrics.items() if metric.startswith("histogram_le_ms:")]
    assert buckets == [n for _, n, _ in report.histogram]
    assert int(metrics["status:OK"]) == 9_993
    assert int(metrics["status:UNAVAILABLE"]) == 5
    assert int(metrics["error:UNAVAILABLE: connection refused"]) == 5


def test_csv_quotes_error_texts_with_commas() -> None:
    report = build_report(CLOSED, run_of([1000], {("INTERNAL", 'boom, "quoted"'): 3}))
    assert metrics_of(render(report, "csv"))['error:INTERNAL: boom, "quoted"'] == "3"


def test_an_unknown_format_is_bad_input(report: Report) -> None:
    with pytest.raises(BadInput, match=r"'yaml'.*summary, json, csv"):
        render(report, "yaml")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    recorder = CallRecorder(T0)
    for i in range(3000):
        latency = 0.05 if i % 500 == 0 else 0.001 + (i % 7) / 10_000
        recorder.record(T0 + i / 100, latency, "OK")
    run = recorder.snapshot()
    path = tmp_path / "load.png"
    plot(build_report(CLOSED, run), run, path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_plot_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report: Report
) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(BadInput, match=r"pip install 'foodmesh\[plot\]'"):
        plot(report, run_of([1000]), tmp_path / "load.png")
    assert not (tmp_path / "load.png").exists()
