"""The local OTLP trace receiver and the waterfall, fed by the real OpenTelemetry SDK exporter.

The SDK's OTLP exporter is synchronous, and with a SimpleSpanProcessor it exports when a span
ends; so spans are made and flushed in a worker thread while the receiver answers on the
test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpc import aio
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh.telemetry.receiver import SpanRecord, TraceReceiver, read_store, records_from_request
from mesh.telemetry.waterfall import render_trace

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[TraceReceiver]:
    receiver = TraceReceiver(store=tmp_path / "traces.jsonl")
    await receiver.start("127.0.0.1", 0)
    yield receiver
    await receiver.stop()


@pytest.fixture
def provider(receiver: TraceReceiver) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "orders"}))
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def emit_place_order(provider: TracerProvider) -> None:
    """A server span with two client attempts under it: the first fails, the retry succeeds."""
    tracer = provider.get_tracer("test_trace_receiver")
    with tracer.start_as_current_span("PlaceOrder", kind=SpanKind.SERVER) as parent:
        parent.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span(
            "catalog/GetItem",
            kind=SpanKind.CLIENT,
            attributes={"mesh.attempt": 1, "mesh.retry": False, "server.port": 5001},
        ) as first:
            first.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: connection refused"))
            first.add_event("ejected", {"endpoint": "127.0.0.1:5001"})
        with tracer.start_as_current_span(
            "catalog/GetItem",
            kind=SpanKind.CLIENT,
            attributes={"mesh.attempt": 2, "mesh.retry": True, "mesh.backoff_ms": 12.5},
        ) as second:
            second.set_status(Status(StatusCode.OK))
    provider.force_flush()


def three_spans(spans: list[SpanRecord]) -> bool:
    return len(spans) >= 3


async def received_order_trace(
    receiver: TraceReceiver, provider: TracerProvider
) -> list[SpanRecord]:
    await asyncio.to_thread(emit_place_order, provider)
    return await receiver.wait_for(three_spans, timeout=TIMEOUT)


async def test_spans_keep_links_service_kinds_attributes_and_status(
    receiver: TraceReceiver, provider: TracerProvider
) -> None:
    spans = await received_order_trace(receiver, provider)

    (trace_id,) = receiver.traces()
    parent, first, second = receiver.traces()[trace_id]
    assert parent.name == "PlaceOrder" and parent.parent_span_id == ""
    assert parent.kind == "SERVER" and parent.status_code == "OK"
    assert {first.parent_span_id, second.parent_span_id} == {parent.span_id}
    assert len({span.span_id for span in spans}) == 3
    assert all(len(span.trace_id) == 32 and len(span.span_id) == 16 for span in spans)
    assert {span.service_name for span in spans} == {"orders"}
    assert (first.kind, second.kind) == ("CLIENT", "CLIENT")
    assert first.status_code == "ERROR"
    assert first.status_message == "UNAVAILABLE: connection refused"
    assert first.attributes == {"mesh.attempt": 1, "mesh.retry": False, "server.port": 5001}
    assert second.attributes == {"mesh.attempt": 2, "mesh.retry": True, "mesh.backoff_ms": 12.5}
    assert first.events == [("ejected", {"endpoint": "127.0.0.1:5001"})]
    assert first.start_ns <= first.end_ns <= second.start_ns <= second.end_ns
    assert parent.duration_ms >= first.duration_ms + second.duration_ms


async def test_store_has_one_json_line_per_span(
    receiver: TraceReceiver, provider: TracerProvider
) -> None:
    spans = await received_order_trace(receiver, provider)

    assert receiver.store is not None
    lines = receiver.store.read_text().splitlines()
    assert len(lines) == 3
    assert {json.loads(line)["name"] for line in lines} == {"PlaceOrder", "catalog/GetItem"}
    assert read_store(receiver.store) == spans


async def test_render_trace_draws_the_tree_with_markers_and_errors(
    receiver: TraceReceiver, provider: TracerProvider
) -> None:
    await received_order_trace(receiver, provider)
    (spans,) = receiver.traces().values()

    text = render_trace(spans, width=120)
    header, *rows = text.splitlines()

    assert header.startswith(f"trace {spans[0].trace_id}")
    assert len(rows) == 3
    assert all(row.startswith("orders ") for row in rows)
    assert "PlaceOrder" in rows[0] and "├─ catalog/GetItem" in rows[1]
    assert "└─ catalog/GetItem" in rows[2]
    assert "ERROR UNAVAILABLE" in rows[1] and "attempt 1" in rows[1]
    assert "retry" not in rows[1]
    assert "attempt 2 retry" in rows[2] and "OK" in rows[2]
    assert all(len(line) <= 120 for line in text.splitlines())
    assert "\x1b[" not in text


async def test_waterfall_cli_prints_the_stored_trace(
    receiver: TraceReceiver, provider: TracerProvider
) -> None:
    spans = await received_order_trace(receiver, provider)

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.telemetry.waterfall",
        "--store",
        str(receiver.store),
        "--width",
        "100",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)

    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert f"trace {spans[0].trace_id}" in text
    assert "PlaceOrder" in text and "catalog/GetItem" in text
    assert "ERROR" in text and "attempt 2 retry" in text


async def test_waterfall_cli_explains_a_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "traces.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.telemetry.waterfall",
        "--store",
        str(missing),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)

    assert process.returncode != 0
    assert out == b""
    assert f"no trace store at {missing}" in err.decode()
    assert "mesh.telemetry.receiver" in err.decode()


async def test_wait_for_times_out_with_a_summary_of_what_arrived(
    receiver: TraceReceiver, provider: TracerProvider
) -> None:
    await received_order_trace(receiver, provider)

    with pytest.raises(TimeoutError, match=r"3 spans received(.|\n)*'PlaceOrder' OK"):
        await receiver.wait_for(lambda spans: len(spans) > 3, timeout=0.05)

    receiver.clear()
    assert receiver.spans() == [] and receiver.traces() == {}
    with pytest.raises(TimeoutError, match="no spans received"):
        await receiver.wait_for(three_spans, timeout=0.05)


def any_value(**value: object) -> common_pb2.AnyValue:
    return common_pb2.AnyValue(**value)  # type: ignore[arg-type]


def export_request(
    *names: str, trace_id: bytes = b"\x01" * 16
) -> trace_service_pb2.ExportTraceServiceRequest:
    spans = [
        trace_pb2.Span(
            trace_id=trace_id,
            span_id=index.to_bytes(8, "big"),
            name=name,
            kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=1_000_000 * index,
            end_time_unix_nano=1_000_000 * (index + 1),
        )
        for index, name in enumerate(names, start=1)
    ]
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(
                    attributes=[
                        common_pb2.KeyValue(key="service.name", value=any_value(string_value="x"))
                    ]
                ),
                scope_spans=[trace_pb2.ScopeSpans(spans=spans)],
            )
        ]
    )


def test_attribute_values_convert_to_json_types() -> None:
    request = export_request("s")
    attributes = {
        "str": any_value(string_value="a"),
        "bool": any_value(bool_value=True),
        "int": any_value(int_value=-7),
        "double": any_value(double_value=0.25),
        "array": any_value(
            array_value=common_pb2.ArrayValue(
                values=[any_value(int_value=1), any_value(string_value="b")]
            )
        ),
        "bytes": any_value(bytes_value=b"\xca\xfe"),
        "map": any_value(
            kvlist_value=common_pb2.KeyValueList(
                values=[common_pb2.KeyValue(key="k", value=any_value(bool_value=False))]
            )
        ),
        "empty": common_pb2.AnyValue(),
    }
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.extend(common_pb2.KeyValue(key=k, value=v) for k, v in attributes.items())

    (record,) = records_from_request(request)

    assert record.attributes == {
        "str": "a",
        "bool": True,
        "int": -7,
        "double": 0.25,
        "array": [1, "b"],
        "bytes": "cafe",
        "map": '{"k": false}',
        "empty": "",
    }
    assert (record.service_name, record.kind, record.status_code) == ("x", "INTERNAL", "UNSET")
    assert record.parent_span_id == "" and record.duration_ms == 1.0
    assert SpanRecord.from_json(record.to_json()) == record


async def test_memory_and_store_keep_only_the_most_recent_spans(tmp_path: Path) -> None:
    store = tmp_path / "traces.jsonl"
    store.write_text("".join(f"old line {n}\n" for n in range(5)))
    receiver = TraceReceiver(store=store, max_spans=3)
    port = await receiver.start()
    assert len(store.read_text().splitlines()) == 3, "trimmed on start"
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
            await stub.Export(export_request("a", "b"), timeout=TIMEOUT)
            await stub.Export(export_request("c", "d", "e"), timeout=TIMEOUT)
    finally:
        await receiver.stop()

    assert [span.name for span in receiver.spans()] == ["c", "d", "e"]
    assert [span.name for span in read_store(store)] == ["c", "d", "e"]


def test_render_trace_puts_orphans_at_the_root_and_bars_on_one_time_line() -> None:
    def span(span_id: str, parent: str, start_ms: int, end_ms: int) -> SpanRecord:
        return SpanRecord(
            trace_id="t" * 32,
            span_id=span_id,
            parent_span_id=parent,
            name=f"op-{span_id}",
            kind="INTERNAL",
            service_name="catalog",
            start_ns=start_ms * 1_000_000,
            end_ns=end_ms * 1_000_000,
            status_code="UNSET",
            attributes={"mesh.hedge": True} if span_id == "c" else {},
        )

    spans = [span("c", "a", 50, 100), span("a", "", 0, 100), span("b", "missing", 0, 50)]
    rows = render_trace(spans, width=60).splitlines()[1:]

    assert [row.split()[1] for row in rows] == ["op-a", "└─", "op-b"]
    assert "op-c" in rows[1] and "hedge" in rows[1]
    bars = [row[row.index("|") + 1 : row.rindex("|")] for row in rows]
    assert bars[0] == "█" * len(bars[0])
    assert bars[1].startswith("·") and bars[1].endswith("█")
    assert bars[2].startswith("█") and bars[2].endswith("·")
    assert all(len(row) <= 60 for row in rows)


async def test_a_taken_port_is_refused_not_shared(receiver: TraceReceiver) -> None:
    assert receiver.endpoint == f"http://127.0.0.1:{receiver.port}"
    second = TraceReceiver()
    with pytest.raises(OSError, match=f"127.0.0.1:{receiver.port}"):
        await second.start("127.0.0.1", receiver.port)
