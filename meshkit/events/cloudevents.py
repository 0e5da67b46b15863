"""Events on the wire: the CloudEvents NATS protocol binding, binary mode.

The attributes travel as headers (`ce-specversion`, `ce-id`, `ce-source`, `ce-type`,
`ce-time`, `ce-subject`), the event's protobuf bytes as the payload (`content-type:
application/protobuf`), and the W3C trace context beside them (`traceparent`, `tracestate`).
`ce-type` is the full protobuf message name, which is all a consumer needs to decode the
payload; `ce-subject` is the aggregate (an order id). `ce-id` is also the `Nats-Msg-Id`, so
that JetStream drops a republished copy within its duplicate window, and the key of the
consumers' inboxes.

Why not the `cloudevents` package: its NATS support is not part of it (HTTP and Kafka are),
and what the binding needs is a mapping of six attributes to headers; the checks below are
the spec's REQUIRED attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

SPECVERSION = "1.0"
CONTENT_TYPE = "application/protobuf"
MSG_ID = "Nats-Msg-Id"
_REQUIRED = ("ce-specversion", "ce-id", "ce-source", "ce-type")


class MalformedEvent(ValueError):
    """A message that is not a CloudEvent of this binding; the reason names what is wrong."""


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """One event as it crosses the broker: its attributes and its protobuf bytes."""

    id: str
    source: str
    type: str
    subject: str
    time: datetime
    data: bytes
    traceparent: str | None = None
    tracestate: str | None = None

    def headers(self) -> dict[str, str]:
        """The NATS headers of the event (binary mode), `Nats-Msg-Id` among them."""
        headers = {
            "ce-specversion": SPECVERSION,
            "ce-id": self.id,
            "ce-source": self.source,
            "ce-type": self.type,
            "ce-time": self.time.isoformat(),
            "ce-subject": self.subject,
            "content-type": CONTENT_TYPE,
            MSG_ID: self.id,
        }
        if self.traceparent:
            headers["traceparent"] = self.traceparent
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        return headers

    @classmethod
    def from_message(cls, headers: Mapping[str, str] | None, data: bytes) -> CloudEvent:
        """The event a NATS message carries; MalformedEvent naming the header at fault."""
        headers = headers or {}
        missing = [name for name in _REQUIRED if not headers.get(name)]
        if missing:
            raise MalformedEvent(f"missing CloudEvents header(s): {', '.join(missing)}")
        if headers["ce-specversion"] != SPECVERSION:
            raise MalformedEvent(
                f"ce-specversion: {headers['ce-specversion']!r}, expected {SPECVERSION!r}"
            )
        content_type = headers.get("content-type", CONTENT_TYPE)
        if content_type != CONTENT_TYPE:
            raise MalformedEvent(f"content-type: {content_type!r}, expected {CONTENT_TYPE!r}")
        try:
            time = datetime.fromisoformat(headers["ce-time"]) if headers.get("ce-time") else None
        except ValueError:
            raise MalformedEvent(f"ce-time: not an RFC 3339 time: {headers['ce-time']!r}") from None
        return cls(
            id=headers["ce-id"],
            source=headers["ce-source"],
            type=headers["ce-type"],
            subject=headers.get("ce-subject", ""),
            time=time if time is not None else datetime.min,
            data=data,
            traceparent=headers.get("traceparent"),
            tracestate=headers.get("tracestate"),
        )


def subject_for(context: str, event_type: str) -> str:
    """The NATS subject of an event type of a bounded context:
    `orders.events.OrderPlaced` for `foodmesh.orders.v1.OrderPlaced` of `orders`."""
    return f"{context}.events.{event_type.rsplit('.', 1)[-1]}"
