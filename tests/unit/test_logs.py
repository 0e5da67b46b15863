"""Log lines carry the current span's trace and span ids, in text and in JSON lines; both stay
one line per event. Spans come from a local SDK TracerProvider, never the global one."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from mesh.telemetry.logs import (
    LOG_FORMAT,
    JsonLinesFormatter,
    OneLineFormatter,
    TraceContextFilter,
    configure_logging,
)

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class Captured:
    """A logger whose records go, through TraceContextFilter, to a string in one format."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        handler = logging.StreamHandler(self.stream)
        handler.addFilter(TraceContextFilter())
        handler.setFormatter(formatter)
        self.logger = logging.getLogger(f"test.logs.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(handler)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


def text() -> Captured:
    return Captured(OneLineFormatter(LOG_FORMAT.format(service="catalog")))


def json_lines() -> Captured:
    return Captured(JsonLinesFormatter("catalog"))


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    yield provider
    provider.shutdown()


@contextlib.contextmanager
def active_span(provider: TracerProvider) -> Iterator[tuple[str, str]]:
    """Run the block in a new current span; yield its (trace id, span id) in hex."""
    with provider.get_tracer("test").start_as_current_span("work") as span:
        context = span.get_span_context()
        yield format(context.trace_id, "032x"), format(context.span_id, "016x")


def test_text_line_inside_a_span_carries_its_ids(provider: TracerProvider) -> None:
    captured = text()
    with active_span(provider) as (trace_id, span_id):
        captured.logger.info("placed order %s", "o-1")
    [line] = captured.lines()
    assert re.fullmatch(
        rf"{TIME} INFO catalog {captured.logger.name} trace=[0-9a-f]{{32}} span=[0-9a-f]{{16}}: "
        r"placed order o-1",
        line,
    ), line
    assert f" trace={trace_id} span={span_id}: " in line


def test_text_line_outside_a_span_has_no_trace_fields() -> None:
    captured = text()
    captured.logger.warning("no span here")
    [line] = captured.lines()
    assert re.fullmatch(rf"{TIME} WARNING catalog {captured.logger.name}: no span here", line)
    assert "trace=" not in line and "span=" not in line


def test_json_line_inside_a_span_carries_its_ids(provider: TracerProvider) -> None:
    captured = json_lines()
    with active_span(provider) as (trace_id, span_id):
        captured.logger.info("placed order %s", "o-1")
    [line] = captured.lines()
    entry = json.loads(line)
    assert re.fullmatch(TIME, entry.pop("time"))
    assert entry == {
        "level": "INFO",
        "service": "catalog",
        "logger": captured.logger.name,
        "message": "placed order o-1",
        "trace_id": trace_id,
        "span_id": span_id,
    }
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and re.fullmatch(r"[0-9a-f]{16}", span_id)


def test_json_line_outside_a_span_has_no_ids() -> None:
    captured = json_lines()
    captured.logger.error("no span here")
    entry = json.loads(captured.lines()[0])
    assert "trace_id" not in entry and "span_id" not in entry
    assert entry["level"] == "ERROR"


def test_filter_sets_empty_ids_outside_a_span() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert TraceContextFilter().filter(record)
    assert (record.__dict__["trace_id"], record.__dict__["span_id"]) == ("", "")


def test_a_traceback_stays_on_one_line_in_both_formats(provider: TracerProvider) -> None:
    as_text, as_json = text(), json_lines()
    with active_span(provider) as (trace_id, _):
        for captured in (as_text, as_json):
            try:
                raise ValueError("line one\nline two")
            except ValueError:
                captured.logger.exception("failed:\nbadly")
    [line] = as_text.lines()
    assert "Traceback (most recent call last):" in line and "\\nValueError: line one" in line
    assert f"trace={trace_id}" in line
    [line] = as_json.lines()
    entry = json.loads(line)
    assert entry["message"] == "failed:\nbadly"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: line one\nline two")
    assert entry["trace_id"] == trace_id


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers: put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("as_json", [False, True])
def test_configure_logging_writes_one_line_per_event_to_stderr(
    as_json: bool, provider: TracerProvider, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "orders", json_lines=as_json)
    configure_logging("INFO", "orders", json_lines=as_json)  # twice: still one handler
    log = logging.getLogger("services.orders")
    log.debug("not shown")
    with active_span(provider) as (trace_id, span_id):
        log.info("inside")
    log.info("outside")
    captured = capsys.readouterr()
    assert captured.out == ""
    inside, outside = captured.err.splitlines()
    if as_json:
        assert json.loads(inside)["trace_id"] == trace_id
        assert json.loads(inside)["span_id"] == span_id
        assert json.loads(outside)["service"] == "orders"
        assert "trace_id" not in json.loads(outside)
    else:
        assert inside.endswith(
            f" INFO orders services.orders trace={trace_id} span={span_id}: inside"
        )
        assert outside.endswith(" INFO orders services.orders: outside")

