"""The instruments of the outbox relay and the event consumers, in the registry of the
process's other metrics (mesh.telemetry.metrics.MeshMetrics.registry)."""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

EVENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Outcome = Literal["applied", "duplicate", "retried", "dead_lettered"]


class EventMetrics:
    """Backlog, publishing, consumer lag, redeliveries and dead letters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._backlog = Gauge(
            "foodmesh_outbox_backlog",
            "Events recorded in the outbox and not yet published (seen by the relay leader).",
            ("context",),
            registry=registry,
        )
        self._oldest = Gauge(
            "foodmesh_outbox_oldest_unpublished_seconds",
            "Age of the oldest event not yet published (0 when none waits).",
            ("context",),
            registry=registry,
        )
        self._leader = Gauge(
            "foodmesh_outbox_relay_leader",
            "1 while this instance holds the outbox relay's lease.",
            ("context",),
            registry=registry,
        )
        self._published = Counter(
            "foodmesh_events_published",
            "Events the relay got a PubAck for, copies JetStream dropped as duplicates included.",
            ("context",),
            registry=registry,
        )
        self._duplicates = Counter(
            "foodmesh_events_publish_duplicates",
            "Publishes JetStream answered as duplicates (republished after a crash or takeover).",
            ("context",),
            registry=registry,
        )
        self._publish_seconds = Histogram(
            "foodmesh_event_publish_duration_seconds",
            "Time from a publish to its PubAck.",
            ("context",),
            buckets=EVENT_BUCKETS,
            registry=registry,
        )
        self._processed = Counter(
            "foodmesh_events_processed",
            "Deliveries a consumer handled, by outcome.",
            ("stream", "consumer", "outcome"),
            registry=registry,
        )
        self._redeliveries = Counter(
            "foodmesh_event_redeliveries",
            "Deliveries that were not the message's first.",
            ("stream", "consumer"),
            registry=registry,
        )
        self._dead_letters = Counter(
            "foodmesh_event_dead_letters",
            "Events moved to the dead-letter subject (undecodable, or failing too often).",
            ("stream", "consumer"),
            registry=registry,
        )
        self._lag = Gauge(
            "foodmesh_event_consumer_lag",
            "Messages of the stream not yet delivered to the consumer.",
            ("stream", "consumer"),
            registry=registry,
        )
        self._lag_seconds = Gauge(
            "foodmesh_event_consumer_lag_seconds",
            "How far behind the stream the consumer is: the age of the last event it handled"
            " while more wait (0 when none waits).",
            ("stream", "consumer"),
            registry=registry,
        )
        self._effect_seconds = Histogram(
            "foodmesh_event_commit_to_effect_seconds",
            "Time from an event's commit at its producer to the consumer's effect's commit.",
            ("stream", "consumer"),
            buckets=EVENT_BUCKETS,
            registry=registry,
        )

    def outbox_backlog(self, context: str, events: int, oldest_seconds: float) -> None:
        self._backlog.labels(context).set(events)
        self._oldest.labels(context).set(oldest_seconds)

    def relay_leader(self, context: str, leading: bool) -> None:
        self._leader.labels(context).set(1 if leading else 0)

    def published(self, context: str, seconds: float, *, duplicate: bool) -> None:
        self._published.labels(context).inc()
        self._publish_seconds.labels(context).observe(seconds)
        if duplicate:
            self._duplicates.labels(context).inc()

    def processed(self, stream: str, consumer: str, outcome: Outcome, *, redelivered: bool) -> None:
        self._processed.labels(stream, consumer, outcome).inc()
        if redelivered:
            self._redeliveries.labels(stream, consumer).inc()
        if outcome == "dead_lettered":
            self._dead_letters.labels(stream, consumer).inc()

    def consumer_lag(self, stream: str, consumer: str, pending: int, seconds: float) -> None:
        self._lag.labels(stream, consumer).set(pending)
        self._lag_seconds.labels(stream, consumer).set(seconds)

    def effect(self, stream: str, consumer: str, seconds: float) -> None:
        self._effect_seconds.labels(stream, consumer).observe(seconds)
