"""Events as the record of what happened: an append-only event store with optimistic
concurrency on each stream (store.py). Later parts publish them (outbox, relay, inbox)."""

from meshkit.events.store import EventStore, RecordedEvent, StaleStream

__all__ = ["EventStore", "RecordedEvent", "StaleStream"]
