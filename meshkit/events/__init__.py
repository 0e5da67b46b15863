"""Events as the record of what happened, and their way to other services: an append-only
event store that is also the outbox (store.py), the CloudEvents NATS binding (cloudevents.py),
the JetStream connection and streams (broker.py), the relay that publishes the outbox in
order (relay.py) and the consumer that applies each event once through an inbox (inbox.py).
Eventuate Tram's three parts (outbox, relay, idempotent consumer) are the model."""

from meshkit.events.broker import DEAD_LETTERS, Broker, StreamSpec, context_stream
from meshkit.events.cloudevents import CloudEvent, MalformedEvent, subject_for
from meshkit.events.inbox import EventConsumer, Handler, ReceivedEvent, RetryLater
from meshkit.events.metrics import EventMetrics
from meshkit.events.relay import OutboxRelay
from meshkit.events.store import EventStore, RecordedEvent, StaleStream

__all__ = [
    "DEAD_LETTERS",
    "Broker",
    "CloudEvent",
    "EventConsumer",
    "EventMetrics",
    "EventStore",
    "Handler",
    "MalformedEvent",
    "OutboxRelay",
    "ReceivedEvent",
    "RecordedEvent",
    "RetryLater",
    "StaleStream",
    "StreamSpec",
    "context_stream",
    "subject_for",
]
