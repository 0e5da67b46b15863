"""An append-only store of protobuf domain events, by stream, on a service's database.

Each aggregate (an order) is a stream of events; its state is a fold of the stream. Appends
use optimistic concurrency: the writer says which version it read (the number of events), and
the append fails with StaleStream when another writer got there first, so two instances that
both act on one aggregate can never both record their step: the loser reloads and decides
again. The check is the primary key (stream_id, version) itself, so it holds across processes
whatever the isolation level; appends run inside the caller's transaction, so that the events
and whatever the caller keeps beside them (a projection table for queries, an idempotency key)
commit together or not at all. A global `position` orders all events of the database, which is
what an outbox relay reads in order (meshkit.events.relay): the table is also the outbox, and
each event keeps the trace context it was recorded in (`traceparent`, `tracestate`), so that
its publication and its consumers' effects join the trace of the call that caused it.

Why not the `eventsourcing` package (the well-kept choice in Python): its applications and
recorders are synchronous (threads and blocking connections), with no asyncio interface, and
its domain model (aggregates as Python objects, pickled or JSON-transcoded state) is not the
protobuf messages that these events are on the wire. What is needed here, an append with a
version check in the caller's transaction and a read of one stream, is a table and
two statements.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from google.protobuf.message import Message
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshkit.storage.database import IntegrityError, Queries, SqlTransaction
from meshkit.storage.schema import AddColumn, BigInt, Migration, Schema

_METADATA = sa.MetaData()
EVENTS = sa.Table(
    "events",
    _METADATA,
    sa.Column("position", BigInt, primary_key=True),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("version", BigInt, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("recorded_at", sa.Text, nullable=False),
    sa.Column("traceparent", sa.Text),
    sa.Column("tracestate", sa.Text),
    sa.UniqueConstraint("stream_id", "version"),
    sqlite_autoincrement=True,
)
SCHEMA = Schema(
    "events",
    (
        Migration(1, (EVENTS,)),
        # Files made before events kept their trace context.
        Migration(2, (AddColumn("events", "traceparent", sa.Text()),
                      AddColumn("events", "tracestate", sa.Text()))),
    ),
)  # fmt: skip
"""The store's table; add it to the schema of the database the events live in."""


_TRACE_CONTEXT = TraceContextTextMapPropagator()


class StaleStream(Exception):
    """The stream has moved on since the writer read it: reload and decide again."""

    def __init__(self, stream_id: str, expected: int) -> None:
        super().__init__(f"stream {stream_id!r} is not at version {expected}")
        self.stream_id = stream_id
        self.expected = expected


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """One stored event: its stream, its version in it (1 = first) and the message."""

    stream_id: str
    version: int
    event: Message
    recorded_at: datetime


class EventStore:
    """Appends and reads streams of the protobuf messages it knows (`event_types`)."""

    def __init__(self, event_types: Iterable[type[Message]]) -> None:
        self._types: Mapping[str, type[Message]] = {t.DESCRIPTOR.full_name: t for t in event_types}

    async def append(
        self,
        transaction: SqlTransaction,
        stream_id: str,
        expected_version: int,
        events: Sequence[Message],
        *,
        now: datetime | None = None,
    ) -> int:
        """Append `events` after version `expected_version` (0: a new stream) and return
        the stream's new version; StaleStream when the stream is not at that version."""
        self._check_types(events)
        # The unique key catches a writer behind the stream, not one ahead of it (a version
        # it never read): that would leave a gap, so the version is checked first too.
        if await self.version(transaction, stream_id) != expected_version:
            raise StaleStream(stream_id, expected_version)
        await self._insert(transaction, stream_id, expected_version, events, now)
        return expected_version + len(events)

    async def append_next(
        self,
        transaction: SqlTransaction,
        stream_id: str,
        events: Sequence[Message],
        *,
        now: datetime | None = None,
    ) -> int:
        """Append `events` at the end of the stream, whatever its version: for a service whose
        events record changes of rows it keeps itself (the store is then only its outbox),
        where the transaction's write lock already orders the writers."""
        self._check_types(events)
        version = await self.version(transaction, stream_id)
        await self._insert(transaction, stream_id, version, events, now)
        return version + len(events)

    async def extend(
        self,
        transaction: SqlTransaction,
        stream_id: str,
        expected_version: int,
        events: Sequence[Message],
        *,
        now: datetime | None = None,
    ) -> list[RecordedEvent]:
        """`append`, returning the whole stream after it: for a writer that folds the new
        state at once, in one read and one insert instead of a version check, the insert and
        a read."""
        self._check_types(events)
        stream = await self.read(transaction, stream_id)
        if (stream[-1].version if stream else 0) != expected_version:
            raise StaleStream(stream_id, expected_version)
        return [*stream, *await self._insert(transaction, stream_id, expected_version, events, now)]

    def _check_types(self, events: Sequence[Message]) -> None:
        for event in events:
            name = event.DESCRIPTOR.full_name
            if name not in self._types:
                raise TypeError(f"{name} is not an event type of this store")

    async def _insert(
        self,
        transaction: SqlTransaction,
        stream_id: str,
        expected_version: int,
        events: Sequence[Message],
        now: datetime | None,
    ) -> list[RecordedEvent]:
        if not events:
            return []
        recorded_at = now or datetime.now(UTC)
        stamp = recorded_at.isoformat(timespec="microseconds")
        recorded = [
            RecordedEvent(stream_id, expected_version + offset, event, recorded_at)
            for offset, event in enumerate(events, start=1)
        ]
        trace_context: dict[str, str] = {}
        _TRACE_CONTEXT.inject(trace_context)
        traceparent, tracestate = trace_context.get("traceparent"), trace_context.get("tracestate")
        parameters: list[object] = []
        for r in recorded:
            data = r.event.SerializeToString()
            parameters += (
                stream_id, r.version, r.event.DESCRIPTOR.full_name, data, stamp,
                traceparent, tracestate,
            )  # fmt: skip
        try:
            await transaction.execute(
                "INSERT INTO events (stream_id, version, event_type, data, recorded_at,"
                " traceparent, tracestate) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(recorded)),
                parameters,
            )
        except IntegrityError:
            raise StaleStream(stream_id, expected_version) from None
        return recorded

    async def read(self, queries: Queries, stream_id: str) -> list[RecordedEvent]:
        """The stream's events in order ([] for an unknown stream); one query, so it needs
        no transaction of its own."""
        rows = await queries.fetch_all(
            "SELECT version, event_type, data, recorded_at FROM events WHERE stream_id = ?"
            " ORDER BY version",
            (stream_id,),
        )
        return [
            RecordedEvent(
                stream_id,
                row["version"],
                self._types[row["event_type"]].FromString(row["data"]),
                datetime.fromisoformat(row["recorded_at"]),
            )
            for row in rows
        ]

    async def version(self, transaction: SqlTransaction, stream_id: str) -> int:
        """The number of events in the stream (0 for an unknown one)."""
        row = await transaction.fetch_one(
            "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?", (stream_id,)
        )
        return int(row[0]) if row is not None else 0
