"""CallRecorder and merge: what a load run records per call, and exact merging of workers'
records (counts add up; percentiles within the HDR histogram's 0.1%)."""

from __future__ import annotations

import pickle
import random
from array import array

import pytest

from meshctl.load.stats import (
    HIGHEST_US,
    CallRecorder,
    RecordedRun,
    _HistogramLayout,
    decode_histogram,
    merge,
    new_histogram,
)

T0 = 1000.0
"""The run's start on the (fake) perf_counter clock."""


def pairs(run: RecordedRun) -> list[tuple[float, float]]:
    floats = array("f", run.timeline)
    return list(zip(floats[0::2], floats[1::2], strict=True))


def recorder_of(latencies_us: list[int], code: str = "OK") -> CallRecorder:
    recorder = CallRecorder(T0)
    for i, us in enumerate(latencies_us):
        recorder.record(T0 + i, us / 1_000_000, code)
    return recorder


def test_percentiles_of_a_uniform_distribution_are_within_the_histogram_precision() -> None:
    recorder = recorder_of(list(range(1, 10_001)))
    assert recorder.count == 10_000
    assert recorder.percentile(50) == pytest.approx(0.005, rel=0.001)
    assert recorder.percentile(90) == pytest.approx(0.009, rel=0.001)
    assert recorder.percentile(99) == pytest.approx(0.0099, rel=0.001)
    assert recorder.percentile(100) == pytest.approx(0.01, rel=0.001)


def test_latencies_below_2_ms_are_exact_to_the_microsecond() -> None:
    recorder = recorder_of([250, 500, 750, 1000])
    assert recorder.percentile(25) == 0.00025
    assert recorder.percentile(50) == 0.0005
    assert recorder.percentile(100) == 0.001


def test_a_recorder_without_calls_reports_zeros() -> None:
    recorder = CallRecorder(T0)
    assert (recorder.count, recorder.errors, recorder.percentile(99)) == (0, 0, 0.0)
    run = recorder.snapshot()
    assert (run.status_counts, run.error_counts, run.timeline) == ({}, {}, b"")
    assert decode_histogram(run.histogram).get_total_count() == 0


def test_statuses_are_counted_and_failures_counted_by_code_and_details() -> None:
    recorder = CallRecorder(T0)
    for _ in range(5):
        recorder.record(T0, 0.001, "OK")
    for _ in range(3):
        recorder.record(T0, 0.002, "UNAVAILABLE", "connection refused")
    recorder.record(T0, 0.002, "UNAVAILABLE", "no healthy upstream")
    recorder.record(T0, 0.5, "DEADLINE_EXCEEDED")
    assert recorder.count == 10
    assert recorder.errors == 5
    run = recorder.snapshot()
    assert run.status_counts == {"OK": 5, "UNAVAILABLE": 4, "DEADLINE_EXCEEDED": 1}
    assert run.error_counts == {
        "UNAVAILABLE: connection refused": 3,
        "UNAVAILABLE: no healthy upstream": 1,
        "DEADLINE_EXCEEDED": 1,
    }


def test_a_latency_beyond_the_histogram_is_clamped_and_counted_not_raised() -> None:
    recorder = CallRecorder(T0)
    recorder.record(T0, 10 * 3600.0, "OK")  # ten hours
    recorder.record(T0, 1e300, "OK")
    recorder.record(T0, float("inf"), "OK")
    recorder.record(T0, float("nan"), "OK")
    recorder.record(T0, -0.5, "OK")  # only a broken clock gives this
    recorder.record(T0, 0.001, "OK")
    assert recorder.count == 6
    run = recorder.snapshot()
    assert run.clamped == 5
    histogram = decode_histogram(run.histogram)
    assert histogram.get_total_count() == 6
    assert histogram.get_count_at_value(HIGHEST_US) == 4
    assert histogram.get_count_at_value(0) == 1
    assert recorder.percentile(100) == pytest.approx(3600.0, rel=0.001)


def test_the_timeline_holds_start_offset_and_latency_of_each_call() -> None:
    recorder = CallRecorder(T0)
    recorder.record(T0 + 0.5, 0.002, "OK")
    recorder.record(T0 + 1.25, 0.004, "UNAVAILABLE", "down")
    assert pairs(recorder.snapshot()) == [
        pytest.approx((0.5, 0.002)),
        pytest.approx((1.25, 0.004)),
    ]


def test_a_full_timeline_keeps_every_kth_call_doubling_k_each_time() -> None:
    recorder = CallRecorder(T0, timeline_limit=4)

    def offsets_after(calls: int) -> list[float]:
        while recorder.count < calls:
            n = recorder.count
            recorder.record(T0 + n, 0.001, "OK")
        return [offset for offset, _ in pairs(recorder.snapshot())]

    assert offsets_after(3) == [0, 1, 2]
    assert offsets_after(4) == [0, 2]  # full with call 3: k = 2
    assert offsets_after(6) == [0, 2, 4]
    assert offsets_after(7) == [0, 4]  # full again with call 6: k = 4
    assert offsets_after(100) == [0, 64]  # k = 64 since call 96
    assert recorder.count == 100  # the histogram and the counters keep every call
    assert decode_histogram(recorder.snapshot().histogram).get_total_count() == 100


def test_a_long_run_cannot_grow_the_timeline_past_its_limit() -> None:
    recorder = CallRecorder(T0, timeline_limit=1000)
    for n in range(10_000):
        recorder.record(T0 + n, 0.001, "OK")
    offsets = [offset for offset, _ in pairs(recorder.snapshot())]
    # one call in 16 (the smallest power of two that fits), evenly spread over the whole run
    assert offsets == [16.0 * i for i in range(625)]


def test_timeline_limit_must_hold_at_least_two_pairs() -> None:
    with pytest.raises(ValueError, match="timeline_limit"):
        CallRecorder(T0, timeline_limit=1)


def test_merging_three_workers_adds_every_count_exactly() -> None:
    first = recorder_of([100, 200, 300])
    second = recorder_of([1000, 2000, 3000, 4000], code="UNAVAILABLE")
    third = CallRecorder(T0)
    third.record(T0, 0.000050, "OK")
    third.record(T0, 0.5, "DEADLINE_EXCEEDED", "deadline passed")
    merged = merge([first.snapshot(), second.snapshot(), third.snapshot()])

    histogram = decode_histogram(merged.histogram)
    assert histogram.get_total_count() == 3 + 4 + 2
    assert histogram.get_min_value() == 50
    assert histogram.get_max_value() == pytest.approx(500_000, rel=0.001)
    for us in (50, 100, 200, 300, 1000, 2000, 3000, 4000):
        assert histogram.get_count_at_value(us) == 1
    assert merged.status_counts == {"OK": 4, "UNAVAILABLE": 4, "DEADLINE_EXCEEDED": 1}
    assert merged.error_counts == {"UNAVAILABLE": 4, "DEADLINE_EXCEEDED: deadline passed": 1}
    assert len(pairs(merged)) == 9


def test_merged_percentiles_are_those_of_all_calls_not_averages() -> None:
    fast = recorder_of([1000] * 99)
    slow = recorder_of([100_000])
    histogram = decode_histogram(merge([fast.snapshot(), slow.snapshot()]).histogram)
    assert histogram.get_value_at_percentile(99) == 1000
    assert histogram.get_value_at_percentile(100) == pytest.approx(100_000, rel=0.001)


def test_an_idle_worker_does_not_change_the_merge() -> None:
    busy = recorder_of([700, 900])
    idle = CallRecorder(T0)
    merged = merge([idle.snapshot(), busy.snapshot(), idle.snapshot()])
    histogram = decode_histogram(merged.histogram)
    assert histogram.get_total_count() == 2
    assert histogram.get_min_value() == 700  # hdrh would take an empty one's minimum as 0
    assert histogram.get_max_value() == 900
    assert merged.status_counts == {"OK": 2}


def test_merge_of_nothing_is_an_empty_run() -> None:
    merged = merge([])
    assert decode_histogram(merged.histogram).get_total_count() == 0
    assert (merged.status_counts, merged.error_counts, merged.timeline) == ({}, {}, b"")


def test_a_snapshot_crosses_processes() -> None:
    recorder = recorder_of([1500, 2500])
    recorder.record(T0, 10 * 3600.0, "OK")
    run = recorder.snapshot()
    copy = pickle.loads(pickle.dumps(run))
    assert copy == run
    assert copy.clamped == 1
    assert decode_histogram(copy.histogram).get_total_count() == 3


def test_a_snapshot_is_not_changed_by_later_calls() -> None:
    recorder = recorder_of([1500])
    run = recorder.snapshot()
    recorder.record(T0, 0.001, "UNAVAILABLE", "down")
    assert run.status_counts == {"OK": 1}
    assert run.error_counts == {}
    assert decode_histogram(run.histogram).get_total_count() == 1


def test_recorded_latencies_land_where_hdrh_itself_puts_them() -> None:
    """record_many computes hdrh's counts index inline: the histogram must be the one hdrh's
    own record_value makes, for values across the whole range and every bucket's edges."""
    rng = random.Random(7)
    values = [0, 1, 2047, 2048, 2049, 4095, 4096, HIGHEST_US - 1, HIGHEST_US]
    values += [2**p + d for p in range(1, 41) for d in (-1, 0, 1) if 2**p + d <= HIGHEST_US]
    values += [int(rng.lognormvariate(8, 2)) % HIGHEST_US for _ in range(20_000)]
    recorder = CallRecorder(T0)
    recorder.record_many([(T0, us / 1_000_000, "OK", None) for us in values])
    reference = new_histogram()
    for us in values:
        reference.record_value(int(us / 1_000_000 * 1_000_000))  # as the recorder converts
    assert _HistogramLayout.of(reference) is not None, "the inline layout is in use"
    mine = decode_histogram(recorder.snapshot().histogram)
    assert mine.get_total_count() == reference.get_total_count() == len(values)
    assert (mine.get_min_value(), mine.get_max_value()) == (
        reference.get_min_value(),
        reference.get_max_value(),
    )
    assert list(mine.counts) == list(reference.counts)
