"""Log lines that carry the trace: every record names the OpenTelemetry span it was logged in.

A trace in Jaeger says where a call was slow or failed; the log lines say why. Putting the
trace id and span id in every line joins the two: grep a service's logs for the trace id of a
failed call, or jump from a line to its trace. `TraceContextFilter` reads the current span from
OpenTelemetry's context (contextvars, so each asyncio task sees its own call's span) and sets
`trace_id` and `span_id` on every record, empty when no valid span is current.

Two formats, both one line per event so that `grep` and log shippers see whole events:
`OneLineFormatter` (text; tracebacks folded into the line, ` trace=<id> span=<id>` after the
logger name only when there is a span) and `JsonLinesFormatter` (one JSON object per line, for
log pipelines that parse fields). JSON comes from the stdlib: a dozen lines, no dependency.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from opentelemetry import trace

LOG_FORMAT = "%(asctime)s %(levelname)s {service} %(name)s%(trace_fields)s: %(message)s"
"""The text line; `{service}` is filled in by `configure_logging`."""


class TraceContextFilter(logging.Filter):
    """Sets `trace_id` (32 hex digits) and `span_id` (16) from the current span on every
    record; both are empty strings when no valid span is current. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = record.span_id = ""
        return True


def _trace_ids(record: logging.LogRecord) -> tuple[str, str]:
    """The record's trace and span ids ("" without a span, or without TraceContextFilter)."""
    return getattr(record, "trace_id", ""), getattr(record, "span_id", "")


class _UtcFormatter(logging.Formatter):
    """ISO-8601 UTC times with milliseconds: 2024-05-01T12:00:00.123Z."""

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


class OneLineFormatter(_UtcFormatter):
    """A text formatter that escapes line breaks, so one event is one line, and fills
    `%(trace_fields)s` with " trace=<id> span=<id>" when the record has a span, else ""."""

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _trace_ids(record)
        record.trace_fields = f" trace={trace_id} span={span_id}" if trace_id else ""
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


class JsonLinesFormatter(_UtcFormatter):
    """One JSON object per record: time, level, service, logger, message; trace_id and span_id
    when the record has a span; exception (its traceback) and stack when there are ones.
    json.dumps escapes line breaks, so an event stays one line."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "service": self.service_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id, span_id = _trace_ids(record)
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = span_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def configure_logging(level: str | int, service_name: str, *, json_lines: bool = False) -> None:
    """Send every log record to stderr as one line, with the trace and span ids of the current
    span: text (UTC time, level, service, logger, trace, message) or, with `json_lines`, JSON.

    Replaces handlers configured earlier, so calling it twice does not double the lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    if json_lines:
        handler.setFormatter(JsonLinesFormatter(service_name))
    else:
        service = service_name.replace("%", "%%")
        handler.setFormatter(OneLineFormatter(LOG_FORMAT.format(service=service)))
    logging.basicConfig(level=level, handlers=[handler], force=True)
