"""Who drives a saga: a lease row per saga, with an owner and an expiry, in the database the
saga's journal lives in, shared by every instance of the orchestrating service.

An instance drives a saga only while it holds the lease, and renews it at every step and on a
timer; a crashed instance stops renewing, the lease lapses, and any other instance (or the
restarted one) takes it over and resumes the saga from its journal. Taking and renewing are
one conditional upsert each, so two instances can never both hold one lease. A paused holder
whose lease lapsed can still be mid-step when the new holder starts: the journal's version
check lets only one of them record the step, and the step's idempotency key gives the
participant's effect once; the old holder finds the lease gone at its next renewal and stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meshkit.storage.sqlite import SqliteDatabase

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS saga_leases (
        saga_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL
    )""",
)
"""The leases' table; add it to the schema of the database the sagas' journal lives in."""


class SagaLeases:
    """Leases on sagas, held by `owner` (one per process) for `ttl` seconds at a time."""

    def __init__(
        self,
        database: SqliteDatabase,
        owner: str,
        *,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"lease ttl: must be > 0 seconds, got {ttl}")
        self._database = database
        self.owner = owner
        self.ttl = ttl
        self._clock = clock

    async def take(self, saga_id: str) -> bool:
        """Take or renew the lease; False when another owner holds it and it has not lapsed."""
        now = self._clock()
        async with self._database.transaction() as transaction:
            changed = await transaction.execute(
                "INSERT INTO saga_leases (saga_id, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (saga_id) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at"
                " WHERE saga_leases.owner = excluded.owner OR saga_leases.expires_at <= ?",
                (saga_id, self.owner, now + self.ttl, now),
            )
        return changed == 1

    async def release(self, saga_id: str) -> None:
        """Give the lease up (a finished saga, or a process that stops)."""
        async with self._database.transaction() as transaction:
            await transaction.execute(
                "DELETE FROM saga_leases WHERE saga_id = ? AND owner = ?", (saga_id, self.owner)
            )

    async def holder(self, saga_id: str) -> str | None:
        """Who holds a lease that has not lapsed, or None."""
        row = await self._database.fetch_one(
            "SELECT owner FROM saga_leases WHERE saga_id = ? AND expires_at > ?",
            (saga_id, self._clock()),
        )
        return None if row is None else str(row["owner"])
