"""The outbox relay: it publishes a service's recorded events to JetStream, in commit order,
each exactly once in the stream.

The outbox is the event store's table (meshkit.events.store): an event is committed in the
same transaction as the state change it records, so there is no change without its event
and no event without its change. The relay reads the events after its cursor in `position`
order and publishes each, in order, with `Nats-Msg-Id` = the event's id; only after the
PubAck does the cursor move past it. On SQLite, `position` order is commit order (writers
hold the file's write lock from BEGIN to COMMIT, so no event can commit behind one already
visible): the relay never skips an event that commits late.

Several instances share one database, and one relay among them publishes at a time: the one
holding the outbox's lease (meshkit.storage.lease), renewed in the transaction that moves
the cursor. The others only try to take the lease now and then, so a crashed holder is
replaced within a lease period. Why this never doubles and keeps order:
- A crash between a PubAck and the cursor's move makes the next holder publish those events
  again. JetStream drops the copies (same `Nats-Msg-Id`) within the stream's duplicate window
  (2 min), far longer than a lease period, and the consumers' inboxes drop any copy after it.
- The cursor is written lazily (at most every `mark_interval`, and when a batch ends), which
  the first point makes safe: it saves a commit per event.
- A holder paused past its lease may publish beside the new holder for a moment. Both
  publish in position order and the stream keeps the first copy of each id; the first copy
  of an event always comes before the first copy of the next one (each publisher sends them
  in order), so the stream's order is still position order. Its next cursor write fails the
  lease fence and it stops.

The broker down: publishes time out, the relay backs off and tries again; the backlog grows
in the table (the `foodmesh_outbox_backlog` gauge) and drains when the broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import sqlalchemy as sa
from nats.js.errors import NoStreamResponseError
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshkit.events.broker import Broker, StreamSpec, context_stream
from meshkit.events.cloudevents import CloudEvent, subject_for
from meshkit.events.metrics import EventMetrics
from meshkit.storage.database import Database, DatabaseUnavailable
from meshkit.storage.lease import LeaseLost, Leases
from meshkit.storage.schema import BigInt, Schema

log = logging.getLogger(__name__)

SCHEMA = Schema.of(
    "outbox",
    sa.Table(
        "outbox_cursors",
        sa.MetaData(),
        sa.Column("relay", sa.Text, primary_key=True),
        sa.Column("position", BigInt, nullable=False),
    ),
)
"""The relay's table; add it to the schema of the database its outbox (events) lives in."""

_TRACE_CONTEXT = TraceContextTextMapPropagator()


def event_id(stream_id: str, version: int) -> str:
    """An event's id (CloudEvents `id`, `Nats-Msg-Id`): its stream and its version there,
    unique within the source and the same every time the event is published."""
    return f"{stream_id}:{version}"


def event_version(event_id: str) -> int:
    """The version in its stream of the event with this id (event_id's inverse), 0 for an
    id of another form: what a consumer orders one aggregate's events by when they may come
    out of order (from several instances' batches, or across streams)."""
    _, _, version = event_id.rpartition(":")
    return int(version) if version.isdigit() else 0


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One row of the outbox, as the relay publishes it."""

    position: int
    event: CloudEvent
    subject: str


class OutboxRelay:
    """Publishes the events of `database`'s event table to the stream of `context`."""

    def __init__(
        self,
        database: Database,
        leases: Leases,
        broker: Broker,
        *,
        context: str,
        source: str | None = None,
        batch_size: int = 256,
        poll_interval: float = 0.02,
        mark_interval: float = 0.2,
        publish_timeout: float = 2.0,
        metrics: EventMetrics | None = None,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
        after_publish: Callable[[OutboxEvent], None] | None = None,
    ) -> None:
        self.context = context
        self._after_publish = after_publish
        """Called after each PubAck, before the cursor moves past the event (a test's crash
        switch)."""
        self.source = source or f"/foodmesh/{context}"
        self.lease_name = f"outbox-relay:{context}"
        self.stream: StreamSpec = context_stream(context)
        self._database = database
        self._leases = leases
        self._broker = broker
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._mark_interval = mark_interval
        self._publish_timeout = publish_timeout
        self._metrics = metrics
        self._tracer = tracer
        self._clock = clock
        self._wakeup = asyncio.Event()
        database.after_commit(self.wake)
        self._cursor: int | None = None  # published up to here (None: read it at the lease)
        self._marked = 0
        self._marked_at = clock()
        self._renewed_at = float("-inf")
        self.published = 0
        """Events this relay got a PubAck for (copies JetStream dropped included)."""

    def wake(self) -> None:
        """Look at the outbox now (this instance just committed to the database: there may be
        new events; called after every commit of `database`)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Relay until cancelled: while holding the lease, publish whatever is new; otherwise
        try for the lease every third of its period."""
        backoff = 0.1
        while True:
            try:
                if not await self._hold_lease():
                    await asyncio.sleep(self._leases.ttl / 3)  # commits don't matter here
                    continue
                sent = await self.relay_batch()
                backoff = 0.1
                if sent < self._batch_size:
                    await self._mark()
                    await self._sleep(self._poll_interval)
            except LeaseLost:
                log.warning("outbox relay %s: lease lost to another instance", self.context)
                self._cursor = None
            except DatabaseUnavailable as exc:
                # Read the cursor again once it is back: the lease may have lapsed meanwhile.
                log.warning("outbox relay %s: %s; retrying in %.1fs", self.context, exc, backoff)
                self._cursor = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning(
                    "outbox relay %s: broker unavailable (%s); retrying in %.1fs",
                    self.context,
                    type(exc).__name__,
                    backoff,
                )
                with contextlib.suppress(DatabaseUnavailable):  # marked at the next chance
                    await self._mark()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def relay_batch(self) -> int:
        """Publish the next batch of unpublished events, in order; how many were sent."""
        if self._cursor is None:
            self._cursor = await self._read_cursor()
            self._marked = self._cursor
        batch = await self._read_batch(self._cursor)
        if self._metrics is not None:
            await self._report_backlog(batch)
        if not batch:
            return 0
        js = await self._broker.ensure_stream(self.stream)
        for item in batch:
            await self._publish(js, item)
            if self._after_publish is not None:
                self._after_publish(item)
            self._cursor = item.position
            self.published += 1
            if self._clock() - self._marked_at >= self._mark_interval:
                await self._mark()
        return len(batch)

    async def _publish(self, js: nats.js.JetStreamContext, item: OutboxEvent) -> None:
        started = time.perf_counter()
        event = item.event
        with self._span(item) as headers:
            try:
                ack = await js.publish(
                    item.subject, event.data, timeout=self._publish_timeout, headers=headers
                )
            except NoStreamResponseError:
                # A broker that lost its store: declare the stream again, then retry.
                self._broker.forget_streams()
                js = await self._broker.ensure_stream(self.stream)
                ack = await js.publish(
                    item.subject, event.data, timeout=self._publish_timeout, headers=headers
                )
        if self._metrics is not None:
            self._metrics.published(
                self.context, time.perf_counter() - started, duplicate=bool(ack.duplicate)
            )

    def _span(self, item: OutboxEvent) -> _PublishSpan:
        return _PublishSpan(self._tracer, item)

    async def _hold_lease(self) -> bool:
        """Take or renew the lease when a third of its period has passed since the last
        renewal (the cursor's writes renew it too)."""
        if self._cursor is not None and self._clock() - self._renewed_at < self._leases.ttl / 3:
            return True
        held = await self._leases.take(self.lease_name)
        if held:
            self._renewed_at = self._clock()
        else:
            self._cursor = None
        if self._metrics is not None:
            self._metrics.relay_leader(self.context, held)
        return held

    async def _mark(self) -> None:
        """Write the cursor (and renew the lease) if it moved since the last write."""
        if self._cursor is None or self._cursor == self._marked:
            return
        cursor = self._cursor
        async with self._database.transaction() as transaction:
            await self._leases.fence(self.lease_name)(transaction)
            await transaction.execute(
                "INSERT INTO outbox_cursors (relay, position) VALUES (?, ?)"
                " ON CONFLICT (relay) DO UPDATE SET position = excluded.position",
                (self.lease_name, cursor),
            )
        self._marked = cursor
        self._marked_at = self._renewed_at = self._clock()

    async def _read_cursor(self) -> int:
        row = await self._database.fetch_one(
            "SELECT position FROM outbox_cursors WHERE relay = ?", (self.lease_name,)
        )
        return int(row["position"]) if row is not None else 0

    async def _read_batch(self, after: int) -> list[OutboxEvent]:
        rows = await self._database.fetch_all(
            "SELECT position, stream_id, version, event_type, data, recorded_at, traceparent,"
            " tracestate FROM events WHERE position > ? ORDER BY position LIMIT ?",
            (after, self._batch_size),
        )
        return [
            OutboxEvent(
                row["position"],
                CloudEvent(
                    id=event_id(row["stream_id"], row["version"]),
                    source=self.source,
                    type=row["event_type"],
                    subject=row["stream_id"],
                    time=datetime.fromisoformat(row["recorded_at"]),
                    data=row["data"],
                    traceparent=row["traceparent"],
                    tracestate=row["tracestate"],
                ),
                subject_for(self.context, row["event_type"]),
            )
            for row in rows
        ]

    async def _report_backlog(self, batch: list[OutboxEvent]) -> None:
        assert self._metrics is not None and self._cursor is not None
        if len(batch) < self._batch_size:
            backlog = len(batch)
        else:
            row = await self._database.fetch_one("SELECT MAX(position) FROM events")
            backlog = int(row[0] or 0) - self._cursor if row is not None else len(batch)
        oldest = (
            max(
                0.0,
                (datetime.now(batch[0].event.time.tzinfo) - batch[0].event.time).total_seconds(),
            )
            if batch
            else 0.0
        )
        self._metrics.outbox_backlog(self.context, backlog, oldest)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def close(self) -> None:
        """Write the cursor of what was published (the lease then lapses by itself, or is
        given up here)."""
        try:
            await self._mark()
            await self._leases.release(self.lease_name)
        except LeaseLost:
            pass


class _PublishSpan:
    """The PRODUCER span of one publish, child of the context the event was recorded in; its
    own context goes into the message's `traceparent`, so that the consumer's span follows."""

    def __init__(self, tracer: trace.Tracer | None, item: OutboxEvent) -> None:
        self._tracer = tracer
        self._item = item
        self._span: trace.Span | None = None

    def __enter__(self) -> dict[str, str]:
        event = self._item.event
        headers = event.headers()
        if self._tracer is None:
            return headers
        parent = _TRACE_CONTEXT.extract(
            {
                k: v
                for k, v in (("traceparent", event.traceparent), ("tracestate", event.tracestate))
                if v
            }
        )
        self._span = self._tracer.start_span(
            f"publish {self._item.subject}",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": self._item.subject,
                "messaging.message.id": event.id,
                "cloudevents.event_id": event.id,
                "cloudevents.event_type": event.type,
                "cloudevents.event_subject": event.subject,
            },
        )
        carrier: dict[str, str] = {}
        _TRACE_CONTEXT.inject(carrier, context=trace.set_span_in_context(self._span))
        headers.update(carrier)
        return headers

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._span is None:
            return
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        self._span.end()
