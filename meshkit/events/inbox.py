"""Consuming events: a durable JetStream pull consumer whose effects are applied exactly once,
through an inbox in the consumer's own database.

JetStream delivers at least once: a message whose ack is lost (the consumer crashed between
its effect and the ack, or the broker went away) comes again. So each consumer records the
id of every event it applied in its `inbox` table, in the same transaction as the effect: a
second delivery finds the id and only acks, with no window in which an effect is committed
and its id is not (Eventuate Tram's idempotent consumer, MassTransit's inbox).

What does not work is never allowed to block the stream or crash the consumer:
- a message that is not a CloudEvent of this binding, of a type nobody declared, or whose
  payload does not decode goes to the dead-letter subject (`deadletter.<consumer>`, in the
  `DEADLETTER` stream) with the reason, at once;
- what follows an applied event's commit (`on_applied`: a push to a device, say) runs before
  the ack, at most once: a crash between the two leaves the effect, and its redelivery finds
  the event in the inbox;
- a handler that fails (or raises RetryLater: the event came before one it depends on, from
  another instance's batch) gets the message again after a backoff (`nak` with a delay), up
  to `max_deliver` deliveries; then it goes to the dead-letter subject too.
Every dead letter is logged with its event id and the reason.

Several instances of a service share one durable consumer (JetStream hands each message to
one of them) and one database (the inbox is shared). Within an instance, messages are
applied one at a time in stream order.

A read model is rebuilt by another consumer of the same streams from their start into a
fresh database (`catch_up`): it records its events in the inbox under the live consumer's
name (`inbox`), so that the live consumer, once pointed at the rebuilt database, skips what
the rebuild applied and applies the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import sqlalchemy as sa
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshkit.events.broker import DEAD_LETTERS, Broker, StreamSpec, dead_letter_subject
from meshkit.events.cloudevents import MSG_ID, CloudEvent, MalformedEvent
from meshkit.events.metrics import EventMetrics, Outcome
from meshkit.storage.database import Database, DatabaseUnavailable, SqlTransaction
from meshkit.storage.schema import Schema

log = logging.getLogger(__name__)

SCHEMA = Schema.of(
    "inbox",
    sa.Table(
        "inbox",
        sa.MetaData(),
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, primary_key=True),
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("applied_at", sa.Text, nullable=False),
    ),
)
"""The inbox's table; add it to the schema of the database the consumer's effects live in."""

_TRACE_CONTEXT = TraceContextTextMapPropagator()


class RetryLater(Exception):
    """The event cannot be applied yet (it depends on one not applied so far): deliver it
    again after a backoff."""


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """An event as a handler gets it: the decoded message and its CloudEvents attributes."""

    message: Message
    id: str
    source: str
    type: str
    subject: str
    time: datetime
    stream: str
    delivery: int
    """1 for the first delivery, 2 for the next, ..."""


Handler = Callable[[SqlTransaction, ReceivedEvent], Awaitable[None]]
"""Applies one event inside the transaction that records it in the inbox."""


class EventConsumer:
    """Applies the events of `stream` (its first subject: `orders.events.>`) to `database`
    through `handlers`, each once."""

    def __init__(
        self,
        broker: Broker,
        database: Database,
        *,
        stream: StreamSpec,
        durable: str,
        event_types: Iterable[type[Message]],
        handlers: Mapping[type[Message], Handler],
        max_deliver: int = 5,
        backoff: tuple[float, ...] = (0.2, 1.0, 5.0, 15.0),
        ack_wait: float = 30.0,
        batch_size: int = 64,
        on_applied: Callable[[ReceivedEvent], Awaitable[None]] | None = None,
        metrics: EventMetrics | None = None,
        tracer: trace.Tracer | None = None,
        before_ack: Callable[[ReceivedEvent], None] | None = None,
        inbox: str | None = None,
        inactive_threshold: float | None = None,
    ) -> None:
        if max_deliver < 1:
            raise ValueError(f"max_deliver: must be >= 1, got {max_deliver}")
        self.stream_spec = stream
        self.stream = stream.name
        self.subjects = stream.subjects[0]
        self.durable = durable
        self.inbox = inbox or durable
        """The consumer's name in the inbox table (the durable's, unless a rebuild's)."""
        self._inactive_threshold = inactive_threshold
        self._broker = broker
        self._database = database
        self._types = {t.DESCRIPTOR.full_name: t for t in event_types}
        self._handlers = {t.DESCRIPTOR.full_name: h for t, h in handlers.items()}
        unknown = set(self._handlers) - set(self._types)
        if unknown:
            raise ValueError(f"handlers for undeclared event types: {sorted(unknown)}")
        self._max_deliver = max_deliver
        self._backoff = backoff or (1.0,)
        self._ack_wait = ack_wait
        self._batch_size = batch_size
        self._on_applied = on_applied
        self._before_ack = before_ack
        """Called after an event's effect committed, before its ack (a test's crash switch)."""
        self._metrics = metrics
        self._tracer = tracer
        self.applied = 0
        """Events this instance applied (inbox rows it wrote)."""
        self._last_time: datetime | None = None
        """The CloudEvents time of the last event handled, for the lag in seconds."""

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=self._max_deliver,
            max_ack_pending=1000,
            filter_subject=self.subjects,
            inactive_threshold=self._inactive_threshold,
        )

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        await self._broker.ensure_stream(DEAD_LETTERS)
        js = await self._broker.ensure_stream(self.stream_spec)
        return await js.pull_subscribe(
            self.subjects, durable=self.durable, stream=self.stream, config=self.config()
        )

    async def _fetch(self, subscription: JetStreamContext.PullSubscription) -> int:
        """Fetch a batch and handle it; how many messages it held (0 after a quiet second)."""
        try:
            messages = await subscription.fetch(self._batch_size, timeout=1.0)
        except TimeoutError:
            return 0
        for message in messages:
            await self.handle(message)
        if messages and self._metrics is not None:
            pending = messages[-1].metadata.num_pending or 0
            behind = 0.0
            if pending and self._last_time is not None:
                now = datetime.now(self._last_time.tzinfo)
                behind = max(0.0, (now - self._last_time).total_seconds())
            self._metrics.consumer_lag(self.stream, self.durable, pending, behind)
        return len(messages)

    async def catch_up(self) -> int:
        """Apply the stream's events from its start up to its last one as of now, then
        delete this consumer (a rebuild's, made for the purpose); the number of events
        applied."""
        js = await self._broker.ensure_stream(self.stream_spec)
        last = (await js.stream_info(self.stream)).state.last_seq
        subscription = await self._subscribe()
        try:
            while True:
                info = await js.consumer_info(self.stream, self.durable)
                if info.delivered.stream_seq >= last and not info.num_ack_pending:
                    return self.applied
                await self._fetch(subscription)
        finally:
            await subscription.unsubscribe()
            await js.delete_consumer(self.stream, self.durable)

    async def run(self) -> None:
        """Fetch and apply until cancelled; a broker away means a wait and a new try."""
        backoff = 0.1
        subscription: JetStreamContext.PullSubscription | None = None
        while True:
            try:
                if subscription is None:
                    subscription = await self._subscribe()
                if await self._fetch(subscription):
                    backoff = 0.1
            except (nats.errors.Error, OSError) as exc:
                log.warning(
                    "consumer %s: broker unavailable (%s); retrying in %.1fs",
                    self.durable,
                    type(exc).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def handle(self, message: Msg) -> Outcome | None:
        """Apply one delivery and ack it (or nak it, or dead-letter it); its outcome, or None
        for an event type this consumer has no handler for (acked)."""
        delivery = message.metadata.num_delivered or 1
        try:
            cloud = CloudEvent.from_message(message.headers, message.data)
            if cloud.type not in self._types:
                raise MalformedEvent(f"ce-type: {cloud.type!r} is not an event type it knows")
            decoded = self._types[cloud.type].FromString(cloud.data)
        except (MalformedEvent, DecodeError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, DecodeError) else str(exc)
            await self._dead_letter(message, reason)
            return self._count("dead_lettered", delivery)
        handler = self._handlers.get(cloud.type)
        if handler is None:
            await message.ack()
            return None
        received = ReceivedEvent(
            decoded,
            cloud.id,
            cloud.source,
            cloud.type,
            cloud.subject,
            cloud.time,
            message.metadata.stream,
            delivery,
        )
        if cloud.time != datetime.min:
            self._last_time = cloud.time
        with self._span(message, cloud):
            try:
                applied = await self._apply_when_available(handler, received, message)
            except Exception as exc:
                if delivery >= self._max_deliver:
                    await self._dead_letter(
                        message, f"failed {delivery} times, last: {type(exc).__name__}: {exc}"
                    )
                    return self._count("dead_lettered", delivery)
                delay = self._backoff[min(delivery, len(self._backoff)) - 1]
                log.log(
                    logging.DEBUG if isinstance(exc, RetryLater) else logging.WARNING,
                    "consumer %s: event %s (%s) not applied (%s: %s); again in %.1fs",
                    self.durable,
                    cloud.id,
                    cloud.type,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await message.nak(delay=delay)
                return self._count("retried", delivery)
        if applied and self._on_applied is not None:
            await self._on_applied(received)
        if applied and self._before_ack is not None:
            self._before_ack(received)
        await message.ack()
        return self._count("applied" if applied else "duplicate", delivery)

    async def _apply_when_available(
        self, handler: Handler, received: ReceivedEvent, message: Msg
    ) -> bool:
        """`_apply`, waited out while the database cannot be reached: the event is not at
        fault, so the wait spends none of its deliveries (it would be dead-lettered after
        `max_deliver`); JetStream is told it is in progress, so it is not delivered again
        meanwhile."""
        backoff = 0.1
        while True:
            try:
                return await self._apply(handler, received)
            except DatabaseUnavailable as exc:
                log.warning(
                    "consumer %s: %s; event %s waits, retrying in %.1fs",
                    self.durable,
                    exc,
                    received.id,
                    backoff,
                )
                await message.in_progress()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _apply(self, handler: Handler, received: ReceivedEvent) -> bool:
        async with self._database.transaction() as transaction:
            fresh = await transaction.execute(
                "INSERT INTO inbox (consumer, source, event_id, applied_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (self.inbox, received.source, received.id, datetime.now(UTC).isoformat()),
            )
            if fresh:
                await handler(transaction, received)
        if fresh:
            self.applied += 1
            if self._metrics is not None and received.time != datetime.min:
                seconds = (datetime.now(received.time.tzinfo) - received.time).total_seconds()
                self._metrics.effect(self.stream, self.durable, max(0.0, seconds))
        return bool(fresh)

    async def _dead_letter(self, message: Msg, reason: str) -> None:
        """Put the message on the dead-letter subject with the reason, then end its
        deliveries. A failed publish raises: the message stays and comes again."""
        headers: dict[str, Any] = dict(message.headers or {})
        meta = message.metadata
        headers.update(
            {
                "x-dead-letter-reason": reason[:500],
                "x-dead-letter-stream": meta.stream,
                "x-dead-letter-sequence": str(meta.sequence.stream),
                "x-dead-letter-subject": message.subject,
                MSG_ID: f"{self.durable}:{meta.stream}:{meta.sequence.stream}",
            }
        )
        js = await self._broker.jetstream()
        await js.publish(dead_letter_subject(self.durable), message.data, headers=headers)
        log.error(
            "consumer %s: event %s (stream %s, sequence %s) dead-lettered: %s",
            self.durable,
            headers.get("ce-id", "<no id>"),
            meta.stream,
            meta.sequence.stream,
            reason,
        )
        await message.term()

    def _count(self, outcome: Outcome, delivery: int) -> Outcome:
        if self._metrics is not None:
            self._metrics.processed(self.stream, self.durable, outcome, redelivered=delivery > 1)
        return outcome

    def _span(self, message: Msg, cloud: CloudEvent) -> AbstractContextManager[object]:
        if self._tracer is None:
            return nullcontext()
        parent = _TRACE_CONTEXT.extract(dict(message.headers or {}))
        return self._tracer.start_as_current_span(
            f"process {message.subject}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": message.subject,
                "messaging.consumer.group.name": self.durable,
                "messaging.message.id": cloud.id,
                "cloudevents.event_id": cloud.id,
                "cloudevents.event_type": cloud.type,
                "cloudevents.event_subject": cloud.subject,
            },
        )
