"""The load tester's call loops and command line, without a network or a wall clock.

The loops run on an event loop whose clock is virtual: when every task waits, time jumps to
the next timer. A fake service that "takes 100 ms" (asyncio.sleep) then costs no real time,
concurrent calls overlap as they would for real, and start times and latencies come out
exact, so the closed model's totals, the open model's schedule and its latency counted from
the scheduled start are checked to the nanosecond. The four call shapes run against a real
in-process grpc.aio server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import selectors
from array import array
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio

from foodmesh.catalog.v1 import catalog_pb2
from mesh.discovery.consul_settings import ConsulSettings
from mesh.testing import InProcessServer
from meshctl.cli import (
    build_parser,
    load_command,
    parse_duration,
    parse_metadata,
    read_data,
)
from meshctl.load.errors import BadInput
from meshctl.load.progress import Progress, ProgressLine
from meshctl.load.request import MethodInfo, RequestTemplate
from meshctl.load.runner import (
    RECORD_BATCH,
    CallLoop,
    LoadPlan,
    PhaseResult,
    WorkerShare,
    invoker,
    split,
)
from meshctl.load.stats import CallRecorder, RecordedRun
from meshctl.load.target import CallSpec, Target, prepare

T = TypeVar("T")
GET_ITEM = MethodInfo(
    "/foodmesh.catalog.v1.CatalogService/GetItem",
    catalog_pb2.GetItemRequest,
    catalog_pb2.Item,
    client_streaming=False,
    server_streaming=False,
)
C = grpc.StatusCode


# -- virtual time ---------------------------------------------------------------------------


class _Now:
    value = 0.0


class _JumpingSelector(selectors.SelectSelector):
    """Never waits: a wait for the next timer moves the clock to it instead."""

    def __init__(self, now: _Now) -> None:
        super().__init__()
        self._now = now

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("deadlock: every task waits and no timer is set")
        self._now.value += max(timeout, 0.0)
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time() is virtual and jumps to the next timer when idle."""

    def __init__(self) -> None:
        self._virtual = _Now()
        super().__init__(_JumpingSelector(self._virtual))

    def time(self) -> float:
        return self._virtual.value


def in_virtual_time(main: Callable[[VirtualTimeLoop], Coroutine[Any, Any, T]]) -> T:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


class FakeService:
    """Answers after `latency(call)` seconds of virtual time; fails as `outcome(call)` says."""

    def __init__(
        self,
        loop: VirtualTimeLoop,
        latency: Callable[[int], float] = lambda n: 0.010,
        outcome: Callable[[int], Exception | None] = lambda n: None,
    ) -> None:
        self.loop = loop
        self.latency = latency
        self.outcome = outcome
        self.starts: list[float] = []
        self.requests: list[bytes] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, requests: Sequence[bytes]) -> bytes:
        n = len(self.starts)
        self.starts.append(self.loop.time())
        self.requests.extend(requests)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency(n))
        finally:
            self.in_flight -= 1
        error = self.outcome(n)
        if error is not None:
            raise error
        return b""


def share(
    *,
    concurrency: int = 4,
    total: int | None = None,
    duration: float | None = None,
    rate: float | None = None,
    warmup: float = 0.0,
    index: int = 0,
    workers: int = 1,
) -> WorkerShare:
    return WorkerShare(index, workers, concurrency, total, duration, rate, warmup, 20.0)


def template(data: str = "{}") -> RequestTemplate:
    return RequestTemplate.parse(data, GET_ITEM)


def timeline(run: RecordedRun) -> list[tuple[float, float]]:
    """(start offset, latency) pairs, in order of completion."""
    floats = array("f", run.timeline)
    return list(zip(floats[0::2], floats[1::2], strict=True))


async def run_loop(
    loop: VirtualTimeLoop, service: FakeService, work: WorkerShare, *, slack: float = 0.0, **kw: Any
) -> tuple[CallRecorder, PhaseResult]:
    calls = CallLoop(service, kw.pop("body", template()), work, clock=loop.time, slack=slack)
    return await calls.run()


def rpc_error(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details, None)


# -- splitting a run across workers ---------------------------------------------------------


@pytest.mark.parametrize(("amount", "parts"), [(7, 3), (6, 3), (2, 2), (1000, 7), (5, 1)])
def test_split_adds_up_and_differs_by_at_most_one(amount: int, parts: int) -> None:
    pieces = [split(amount, parts, i) for i in range(parts)]
    assert sum(pieces) == amount
    assert max(pieces) - min(pieces) <= 1
    assert pieces == sorted(pieces, reverse=True)  # the remainder goes to the first ones


def test_plan_shares_split_concurrency_and_total_exactly() -> None:
    shares = LoadPlan(concurrency=5, total=7, rate=90.0, workers=3).shares()
    assert [s.concurrency for s in shares] == [2, 2, 1]
    assert [s.total for s in shares] == [3, 2, 2]
    assert [s.index for s in shares] == [0, 1, 2]
    assert all(s.rate == 90.0 and s.workers == 3 for s in shares)


def test_plan_without_total_or_duration_makes_the_default_total() -> None:
    assert LoadPlan().bounded_total == 200
    assert LoadPlan(duration=5.0).bounded_total is None
    assert LoadPlan(duration=5.0).shares()[0].total is None


def test_workers_interleave_on_one_schedule() -> None:
    """Worker w of K makes the run's calls w, w+K, w+2K...: their union is the schedule."""
    shares = LoadPlan(concurrency=6, rate=200.0, workers=3).shares()
    due = sorted(s.scheduled(i) for s in shares for i in range(10))
    assert due == pytest.approx([j / 200.0 for j in range(30)])
    assert sorted(s.call_number(i) for s in shares for i in range(10)) == list(range(30))


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"concurrency": 0}, "--concurrency"),
        ({"total": 0}, "--total"),
        ({"duration": 0.0}, "--duration"),
        ({"rate": -1.0}, "--rate"),
        ({"rate": float("inf")}, "--rate"),
        ({"warmup": -1.0}, "--warmup"),
        ({"timeout": 0.0}, "--timeout"),
        ({"workers": 0}, "--workers"),
        ({"workers": 3, "concurrency": 2}, "--workers (3) must not exceed --concurrency"),
        ({"workers": 3, "concurrency": 4, "total": 2}, "--workers (3) must not exceed --total"),
    ],
)
def test_plan_refuses_bad_numbers_naming_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(BadInput, match=flag.replace("(", r"\(").replace(")", r"\)")):
        LoadPlan(**kwargs)


# -- closed model ---------------------------------------------------------------------------


def test_closed_model_makes_exactly_the_total_with_the_concurrency() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.001 * (1 + n % 7))
        recorder, result = await run_loop(loop, service, share(concurrency=8, total=103))
        assert len(service.starts) == recorder.count == 103
        assert service.max_in_flight == 8
        assert recorder.snapshot().status_counts == {"OK": 103}
        assert result.max_lag == 0.0 and not result.interrupted

    in_virtual_time(main)


def test_closed_model_with_duration_calls_back_to_back_until_it_is_over() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.010)
        recorder, result = await run_loop(loop, service, share(concurrency=4, duration=1.0))
        # Each task starts at 0, 10, ..., 990 ms: 100 calls; the last ends at 1.0 s.
        assert recorder.count == 400
        assert result.elapsed == pytest.approx(1.0)
        assert all(latency == pytest.approx(0.010) for _, latency in timeline(recorder.snapshot()))

    in_virtual_time(main)


def test_failed_calls_are_counted_by_code_and_message() -> None:
    def outcome(n: int) -> Exception | None:
        if n % 4 == 1:
            return rpc_error(C.UNAVAILABLE, "down")
        if n % 4 == 2:
            return ValueError("client-side bug")
        return None

    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, outcome=outcome)
        recorder, _ = await run_loop(loop, service, share(concurrency=2, total=40))
        run = recorder.snapshot()
        assert run.status_counts == {"OK": 20, "UNAVAILABLE": 10, "UNKNOWN": 10}
        assert run.error_counts == {
            "UNAVAILABLE: down": 10,
            "UNKNOWN: ValueError: client-side bug": 10,
        }

    in_virtual_time(main)


def test_warmup_is_not_recorded_and_call_numbers_go_on() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.010)
        body = template('{"item_id": "{{n}}"}')
        work = share(concurrency=1, total=5, warmup=0.05)
        recorder, result = await run_loop(loop, service, work, body=body)
        assert recorder.count == 5
        assert len(service.starts) == 10  # 5 in the 50 ms of warm-up, then 5 measured
        ids = [catalog_pb2.GetItemRequest.FromString(r).item_id for r in service.requests]
        assert ids == [str(n) for n in range(10)]
        assert result.elapsed == pytest.approx(0.05)

    in_virtual_time(main)


def test_call_numbers_never_repeat_across_workers() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.001 * (1 + n % 3))
        body = '{"item_id": "{{n}}"}'
        plan = LoadPlan(concurrency=6, total=30, workers=3)
        loops = [
            CallLoop(service, RequestTemplate.parse(body, GET_ITEM, s.index), s, clock=loop.time)
            for s in plan.shares()
        ]
        await asyncio.gather(*(calls.run() for calls in loops))
        ids = sorted(
            int(catalog_pb2.GetItemRequest.FromString(r).item_id) for r in service.requests
        )
        assert ids == list(range(30))

    in_virtual_time(main)


def test_stop_ends_the_run_and_drops_the_calls_in_flight() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.100)
        calls = CallLoop(service, template(), share(concurrency=3, total=1000), clock=loop.time)
        running = asyncio.ensure_future(calls.run())
        await asyncio.sleep(0.25)  # 2 rounds of 3 calls done, 3 in flight
        calls.stop()
        recorder, result = await running
        assert recorder.count == 6
        assert len(service.starts) == 9
        assert result.interrupted
        assert result.elapsed == pytest.approx(0.25)

    in_virtual_time(main)


def test_calls_reach_the_recorder_in_batches_and_all_by_the_end() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.001)
        calls = CallLoop(service, template(), share(concurrency=4, total=1000), clock=loop.time)
        running = asyncio.ensure_future(calls.run())
        await asyncio.sleep(0.1005)  # 400 calls have ended
        assert calls.recorder is not None
        assert 400 - RECORD_BATCH < calls.recorder.count <= 400
        recorder, _ = await running
        assert recorder.count == 1000

    in_virtual_time(main)


# -- open model -----------------------------------------------------------------------------


def test_open_model_starts_calls_on_schedule() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.005 if n % 2 else 0.015)
        recorder, result = await run_loop(loop, service, share(rate=100.0, total=50))
        assert service.starts == pytest.approx([j / 100 for j in range(50)], abs=1e-9)
        latencies = sorted(latency for _, latency in timeline(recorder.snapshot()))
        assert latencies[:25] == pytest.approx([0.005] * 25)
        assert latencies[25:] == pytest.approx([0.015] * 25)
        assert result.max_lag == 0.0
        assert result.elapsed == pytest.approx(0.49 + 0.005)  # the last call is a fast one

    in_virtual_time(main)


def test_open_model_duration_gives_rate_times_duration_calls() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.002)
        recorder, result = await run_loop(loop, service, share(rate=250.0, duration=2.0))
        assert recorder.count == 500
        assert service.starts[-1] == pytest.approx(1.996)
        assert result.missed == 0

    in_virtual_time(main)


def test_open_model_ends_on_time_and_counts_the_calls_it_could_not_start() -> None:
    """100/s due for 1 s, one slot of 50 ms: 20 calls start, 80 are missed, and the run does
    not go on for 4 more seconds to send them."""

    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.050)
        work = share(concurrency=1, rate=100.0, duration=1.0)
        recorder, result = await run_loop(loop, service, work)
        assert recorder.count == 20
        assert result.missed == 80
        assert result.elapsed == pytest.approx(1.0)
        latencies = [latency for _, latency in timeline(recorder.snapshot())]
        assert latencies == pytest.approx([0.04 * n + 0.05 for n in range(20)], abs=1e-6)

    in_virtual_time(main)


def test_open_model_counts_latency_from_the_scheduled_start() -> None:
    """100 calls/s due, but 2 slots of 100 ms serve only 20/s: the queue grows, and each
    call's latency includes its wait, where a closed loop would say 100 ms for every one."""

    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.100)
        recorder, result = await run_loop(loop, service, share(concurrency=2, rate=100.0, total=20))
        # Calls 0 and 1 start on time (0 and 10 ms); then each waits for a slot: call 2k
        # starts at k * 100 ms, call 2k+1 10 ms later.
        starts = [(j // 2) * 0.1 + (j % 2) * 0.01 for j in range(20)]
        assert service.starts == pytest.approx(starts, abs=1e-9)
        expected = sorted(start + 0.1 - j / 100 for j, start in enumerate(starts))
        got = sorted(latency for _, latency in timeline(recorder.snapshot()))
        assert got == pytest.approx(expected, abs=1e-6)
        assert recorder.percentile(50) > 0.4  # a closed loop would report 0.1
        assert result.max_lag == pytest.approx(0.91 - 0.19)

    in_virtual_time(main)


def test_open_model_starts_up_to_slack_early_and_measures_from_the_actual_start() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.004)
        work = share(concurrency=1, rate=10.0, total=3)
        recorder, result = await run_loop(loop, service, work, slack=0.001)
        assert service.starts == pytest.approx([0.0, 0.099, 0.199], abs=1e-9)
        assert [lat for _, lat in timeline(recorder.snapshot())] == pytest.approx([0.004] * 3)
        assert result.max_lag == 0.0

    in_virtual_time(main)


def test_workers_of_one_open_run_interleave() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        service = FakeService(loop, latency=lambda n: 0.001)
        plan = LoadPlan(concurrency=4, rate=100.0, total=21, workers=2)
        loops = [
            CallLoop(service, template(), s, clock=loop.time, slack=0.0) for s in plan.shares()
        ]
        runs = await asyncio.gather(*(calls.run() for calls in loops))
        assert [recorder.count for recorder, _ in runs] == [11, 10]
        assert sorted(service.starts) == pytest.approx([j / 100 for j in range(21)], abs=1e-9)

    in_virtual_time(main)


# -- the call shapes, against a real in-process server --------------------------------------


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"".join([r async for r in requests])


async def _download(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def _both(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _fail(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(C.RESOURCE_EXHAUSTED, "busy")
    return b""


@pytest.fixture
async def shapes_server() -> AsyncIterator[str]:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
        "Download": grpc.unary_stream_rpc_method_handler(_download),
        "Both": grpc.stream_stream_rpc_method_handler(_both),
        "Fail": grpc.unary_stream_rpc_method_handler(_fail),
    }
    shapes = grpc.method_handlers_generic_handler("t.Shapes", handlers)
    async with InProcessServer(shapes) as server:
        yield server.address


@pytest.mark.parametrize(
    ("name", "client_streaming", "server_streaming"),
    [
        ("Unary", False, False),
        ("Upload", True, False),
        ("Download", False, True),
        ("Both", True, True),
    ],
)
async def test_invoker_makes_one_whole_call_of_each_shape(
    shapes_server: str, name: str, client_streaming: bool, server_streaming: bool
) -> None:
    method = MethodInfo(
        f"/t.Shapes/{name}", catalog_pb2.GetItemRequest, catalog_pb2.Item,
        client_streaming, server_streaming,
    )  # fmt: skip
    body = '[{"item_id": "a"}, {"item_id": "b"}]' if client_streaming else '{"item_id": "a"}'
    requests = RequestTemplate.parse(body, method).render(0)
    async with aio.insecure_channel(shapes_server) as channel:
        call = invoker(channel, method, 5.0, (("x-test", "1"),))
        result = await call(requests)
    if not server_streaming:
        assert result == b"".join(requests)


async def test_invoker_raises_the_status_of_a_failed_stream(shapes_server: str) -> None:
    method = MethodInfo("/t.Shapes/Fail", catalog_pb2.GetItemRequest, catalog_pb2.Item, False, True)
    async with aio.insecure_channel(shapes_server) as channel:
        with pytest.raises(aio.AioRpcError) as failed:
            await invoker(channel, method, 5.0, None)([b""])
    assert failed.value.code() == C.RESOURCE_EXHAUSTED


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("2m", 120.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
        ("2", 2.0),
        ("0.25", 0.25),
    ],
)
def test_durations_take_go_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "3x", "1m30", "ten seconds", "5 s", "-1s", "nan"])
def test_bad_durations_are_refused_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("tenant=acme", ("tenant", "acme")),
        ("X-Request-Source: load test", ("x-request-source", "load test")),
        ("url=http://a:1/?q=2", ("url", "http://a:1/?q=2")),
        ("trace-bin=AAE=", ("trace-bin", b"\x00\x01")),
        ("empty=", ("empty", "")),
    ],
)
def test_metadata_pairs(text: str, pair: tuple[str, str | bytes]) -> None:
    assert parse_metadata(text) == pair


@pytest.mark.parametrize("text", ["novalue", "=x", "grpc-timeout=1", "bad key=1", "a-bin=!!"])
def test_bad_metadata_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="metadata"):
        parse_metadata(text)


def test_data_comes_from_the_flag_a_file_or_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = tmp_path / "body.json"
    body.write_text('{"item_id": "file"}')
    assert read_data('{"item_id": "x"}') == '{"item_id": "x"}'
    assert read_data(f"@{body}") == '{"item_id": "file"}'
    monkeypatch.setattr("sys.stdin", io.StringIO('{"item_id": "stdin"}'))
    assert read_data("@-") == '{"item_id": "stdin"}'
    with pytest.raises(BadInput, match="cannot read"):
        read_data(f"@{tmp_path / 'missing.json'}")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["load", *argv])


def test_flags_become_a_spec_and_a_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.0.0.5:18500")
    command = load_command(
        parse(
            "catalog", "foodmesh.catalog.v1.CatalogService/GetItem", "-d", "{}", "-c", "16",
            "-z", "1m", "--rate", "500", "--warmup", "2s", "-t", "250ms", "-m", "a=1",
            "-m", "b: 2", "--workers", "2", "-O", "json",
        )
    )  # fmt: skip
    assert command.spec.target == Target("catalog", ConsulSettings("10.0.0.5", 18500))
    assert command.spec.metadata == (("a", "1"), ("b", "2"))
    assert command.plan == LoadPlan(
        concurrency=16, duration=60.0, rate=500.0, warmup=2.0, timeout=0.25, workers=2
    )
    assert command.format == "json"


def test_an_address_target_needs_no_consul() -> None:
    command = load_command(parse("127.0.0.1:5000", "pkg.S/M", "--consul", "nowhere:1"))
    assert command.spec.target.is_address
    assert command.spec.target.name == "127.0.0.1:5000"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("catalog", "p.S/M", "--consul", "http://:0"), "--consul"),
        (("host:notaport", "p.S/M"), "bad address"),
        (("catalog", "p.S/M", "--connect-timeout", "0"), "--connect-timeout"),
        (("catalog", "p.S/M", "-o", "/no/such/dir/report.txt"), "--output"),
        (("catalog", "p.S/M", "-c", "1", "--workers", "2"), "--workers"),
    ],
)
def test_bad_flag_values_are_bad_input(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        load_command(parse(*argv))


def test_progress_line_rewrites_itself_with_the_rate_of_the_last_interval() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream)
    line.show(1.0, None)
    line.show(2.0, Progress(count=1500, errors=3, p50=0.0021, p99=0.0105))
    line.show(3.0, Progress(count=2500, errors=3, p50=0.002, p99=0.01))
    line.clear()
    parts = stream.getvalue().split("\r")
    assert parts[1].startswith("   1.0s  starting")
    assert "1,500 calls" in parts[2] and "1,500/s" in parts[2] and "errors 3" in parts[2]
    assert "p50 2.10 ms" in parts[2] and "p99 10.50 ms" in parts[2]
    assert "1,000/s" in parts[3]
    assert all(part.endswith("\x1b[K") for part in parts[1:])


async def test_a_malformed_method_name_fails_before_connecting() -> None:
    """Nothing listens at the address and the connect timeout is long: the answer comes at
    once, and it is about the method name, not the connection."""
    spec = CallSpec(Target("127.0.0.1:1"), "GetItem", connect_timeout=60.0)
    with pytest.raises(BadInput, match="bad method name 'GetItem'"):
        await asyncio.wait_for(prepare(spec), timeout=5.0)
