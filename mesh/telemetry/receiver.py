"""A small OTLP/gRPC trace receiver, for developer machines and tests.

Services export traces over OTLP/gRPC to whatever `OTEL_EXPORTER_OTLP_ENDPOINT` names; in
production and in docker-compose that is Jaeger. Jaeger cannot run everywhere (no binary, no
container engine on some machines), so this module stands in for it: it serves the same
`opentelemetry.proto.collector.trace.v1.TraceService/Export` call, so an exporter cannot tell
the difference, and turns each exported span into a flat `SpanRecord`.

Tests read the records in memory and wait for a condition over them (`TraceReceiver.wait_for`,
woken by each export rather than polling on a timer). The dev stack persists them as JSON lines
in a store file, which `python -m mesh.telemetry.waterfall` reads from another process; the
store is trimmed to the most recent spans so that it stays small however long the stack runs.

    python -m mesh.telemetry.receiver [--host 127.0.0.1] [--port 4317] [--store PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

AttributeValue = str | int | float | bool | list["AttributeValue"]
Attributes = dict[str, AttributeValue]
SpanPredicate = Callable[[list["SpanRecord"]], bool]

log = logging.getLogger(__name__)

DEFAULT_MAX_SPANS = 10_000
DEFAULT_PORT = 4317
"""OTLP/gRPC's registered port: the CLI's default, so exporters need no configuration."""


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, flattened from OTLP: ids in hex, enums by their short names."""

    trace_id: str
    span_id: str
    parent_span_id: str
    """"" for a root span."""
    name: str
    kind: str
    """SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER or UNSPECIFIED."""
    service_name: str
    """The exporting resource's `service.name` ("" when it set none)."""
    start_ns: int
    end_ns: int
    status_code: str
    """OK, ERROR or UNSET."""
    status_message: str = ""
    attributes: Attributes = field(default_factory=dict, hash=False)
    events: list[tuple[str, Attributes]] = field(default_factory=list, hash=False)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> str:
        """One line of the store file."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> SpanRecord:
        """Parse one store line; raises ValueError (or KeyError, TypeError) if malformed."""
        data: dict[str, Any] = json.loads(line)
        events = [(str(name), dict(attrs)) for name, attrs in data.pop("events", [])]
        return cls(**data, events=events)


def records_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    """Flatten an OTLP export request into one record per span."""
    records = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service_name = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(_record(span, service_name))
    return records


def _record(span: trace_pb2.Span, service_name: str) -> SpanRecord:
    return SpanRecord(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        service_name=service_name,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        status_code=trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        status_message=span.status.message,
        attributes=_attributes(span.attributes),
        events=[(event.name, _attributes(event.attributes)) for event in span.events],
    )


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> Attributes:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: common_pb2.AnyValue) -> AttributeValue:
    """OpenTelemetry's attribute types map one to one; the rest (bytes, nested maps, which
    the SDK never emits for span attributes) become strings so that a record stays JSON."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "bytes_value":
        return value.bytes_value.hex()
    if kind == "kvlist_value":
        return json.dumps(_attributes(value.kvlist_value.values), sort_keys=True)
    return ""


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, accept: Callable[[list[SpanRecord]], Awaitable[None]]) -> None:
        self._accept = accept

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        await self._accept(records_from_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceReceiver:
    """Receives OTLP/gRPC trace exports on a grpc.aio server and keeps the spans.

    Memory holds the last `max_spans` spans. With a `store`, each span is also appended to
    that file as one JSON line; the file is trimmed to the last `max_spans` lines on start and
    whenever it reaches twice that, by an atomic replace, so a reader never sees half a file.
    """

    def __init__(self, store: Path | None = None, max_spans: int = DEFAULT_MAX_SPANS) -> None:
        if max_spans < 1:
            raise ValueError(f"max_spans must be at least 1, got {max_spans}")
        self.store = store
        self.max_spans = max_spans
        self._spans: deque[SpanRecord] = deque(maxlen=max_spans)
        self._changed = asyncio.Condition()
        self._server: aio.Server | None = None
        self._store_lines = 0
        self.port = 0
        """The bound port once started."""
        self.endpoint = ""
        """`http://host:port` once started: the value for OTEL_EXPORTER_OTLP_ENDPOINT."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve TraceService on host:port (0: any free port); returns the bound port."""
        if self._server is not None:
            raise RuntimeError("TraceReceiver already started")
        if self.store is not None:
            self._store_lines = _trim_store(self.store, self.max_spans)
        # Without SO_REUSEPORT, a second receiver on a taken port fails instead of silently
        # sharing the exports with the first.
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        add_servicer = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add_servicer(_TraceServicer(self._accept), server)  # type: ignore[no-untyped-call]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            await server.stop(None)
            raise OSError(f"trace receiver cannot listen on {address} (address in use?)")
        await server.start()
        self._server = server
        self.port = bound
        shown = f"[{host}]" if ":" in host else host
        self.endpoint = f"http://{shown}:{bound}"
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving; exports in flight get `grace` seconds to finish."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    def spans(self) -> list[SpanRecord]:
        """Every span kept, in the order received."""
        return list(self._spans)

    def traces(self) -> dict[str, list[SpanRecord]]:
        """Spans kept, by trace id, each trace's spans in start order."""
        return group_by_trace(self._spans)

    def clear(self) -> None:
        """Forget the spans in memory (the store file keeps its lines)."""
        self._spans.clear()

    async def wait_for(self, predicate: SpanPredicate, timeout: float) -> list[SpanRecord]:
        """Wait until `predicate(all spans kept)` holds; returns those spans.

        Woken by each export. Raises TimeoutError describing the spans kept if it does not
        hold within `timeout` seconds.
        """
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: predicate(list(self._spans)))
            except TimeoutError:
                raise TimeoutError(
                    f"condition over received spans not met within {timeout}s; "
                    f"{summarize(self._spans)}"
                ) from None
            return list(self._spans)

    async def _accept(self, records: list[SpanRecord]) -> None:
        self._spans.extend(records)
        if self.store is not None and records:
            try:
                self._append_to_store(self.store, records)
            except OSError as error:
                # The spans are still in memory; an exporter must not retry over our disk.
                log.warning("trace store %s not written: %s", self.store, error)
        async with self._changed:
            self._changed.notify_all()

    def _append_to_store(self, store: Path, records: list[SpanRecord]) -> None:
        # A few kilobytes per export: written inline, so lines land in the order received.
        store.parent.mkdir(parents=True, exist_ok=True)
        with store.open("a", encoding="utf-8") as out:
            out.writelines(record.to_json() + "\n" for record in records)
        self._store_lines += len(records)
        if self._store_lines >= 2 * self.max_spans:
            self._store_lines = _trim_store(store, self.max_spans)


def group_by_trace(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Spans by trace id, each trace's spans sorted by start time."""
    traces: dict[str, list[SpanRecord]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    for members in traces.values():
        members.sort(key=lambda span: span.start_ns)
    return traces


def summarize(spans: Iterable[SpanRecord], limit: int = 20) -> str:
    """A short description of spans, for failure messages."""
    kept = list(spans)
    if not kept:
        return "no spans received"
    lines = [
        f"  {s.trace_id[:8]} {s.service_name or '?'} {s.kind} {s.name!r} {s.status_code}"
        for s in kept[-limit:]
    ]
    more = f" (last {limit} shown)" if len(kept) > limit else ""
    return f"{len(kept)} spans received{more}:\n" + "\n".join(lines)


def read_store(store: Path) -> list[SpanRecord]:
    """Every well-formed span in a store file. A line cut short (a receiver writing while we
    read) is skipped. Raises FileNotFoundError if there is no store."""
    return list(_parse_lines(store.read_text(encoding="utf-8").splitlines()))


def _parse_lines(lines: Iterable[str]) -> Iterator[SpanRecord]:
    for line in lines:
        if line.strip():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                yield SpanRecord.from_json(line)


def _trim_store(store: Path, keep: int) -> int:
    """Keep the last `keep` lines of the store; returns the number of lines left."""
    try:
        lines = store.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    if len(lines) <= keep:
        return len(lines)
    partial = store.with_name(store.name + ".tmp")
    partial.write_text("".join(lines[-keep:]), encoding="utf-8")
    os.replace(partial, store)
    return keep


def default_store() -> Path:
    """The per-user store file that the receiver CLI writes and the waterfall CLI reads."""
    return Path(platformdirs.user_data_dir("foodmesh")) / "traces.jsonl"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.telemetry.receiver",
        description="Receive OTLP/gRPC traces locally, for `python -m mesh.telemetry.waterfall`.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help=f"JSON-lines span store (default: {default_store()})",
    )
    parser.add_argument("--no-store", action="store_true", help="keep spans in memory only")
    parser.add_argument("--max-spans", type=int, default=DEFAULT_MAX_SPANS)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    store = None if args.no_store else (args.store or default_store())
    receiver = TraceReceiver(store=store, max_spans=args.max_spans)
    try:
        await receiver.start(args.host, args.port)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    print(f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver.endpoint}", flush=True)
    print(f"trace receiver: storing spans in {store or 'memory only'}", file=sys.stderr)
    await stopping.wait()
    await receiver.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
