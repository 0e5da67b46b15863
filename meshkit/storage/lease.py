"""Who does a piece of work that only one instance of a service may do at a time (drive a
saga, relay an outbox): a lease row per name, with an owner and an expiry, in the database
the work's records live in, shared by every instance of the service.

For a saga: an instance drives it only while it holds the lease, and renews it on a timer and in the
transaction of every step it records (`fence()`: the record commits only while the lease is
its own, at no commit of its own); a crashed instance stops renewing, the lease lapses, and
any other instance (or the restarted one) takes it over and resumes the saga from its
journal. Taking and renewing are one conditional upsert each, so two instances can never both
hold one lease. A paused holder whose lease lapsed can still be mid-step when the new holder
starts: the fence (and the journal's version check) let only one of them record the step, and
the step's idempotency key gives the participant's effect once; the old holder finds the
lease gone at its next record or renewal and stops. The record that ends a saga gives its
lease up in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import sqlalchemy as sa

from meshkit.storage.database import Database, SqlTransaction
from meshkit.storage.schema import Schema

Fence = Callable[[SqlTransaction], Awaitable[None]]
"""A check that runs first in a journal write's transaction; what it raises rolls it back."""

SCHEMA = Schema.of(
    "leases",
    sa.Table(
        "leases",
        sa.MetaData(),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    ),
)
"""The leases' table; add it to the schema of the database the leased work's records live in."""


class LeaseLost(Exception):
    """Another instance took the leased work (a saga) over."""


class Leases:
    """Leases on named work (a saga id, an outbox), held by `owner` (one per process) for
    `ttl` seconds at a time."""

    def __init__(
        self,
        database: Database,
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

    async def take(self, name: str, within: SqlTransaction | None = None) -> bool:
        """Take or renew the lease; False when another owner holds it and it has not lapsed.
        `within`: in that open transaction (which commits it), not one of its own."""
        if within is None:
            async with self._database.transaction() as transaction:
                return await self.take(name, transaction)
        now = self._clock()
        changed = await within.execute(
            "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
            " expires_at = excluded.expires_at"
            " WHERE leases.owner = excluded.owner OR leases.expires_at <= ?",
            (name, self.owner, now + self.ttl, now),
        )
        return changed == 1

    async def release(self, name: str, within: SqlTransaction | None = None) -> bool:
        """Give the lease up (a finished saga, or a process that stops); False when it was
        not ours to give (another owner holds it, or nobody does)."""
        if within is None:
            async with self._database.transaction() as transaction:
                return await self.release(name, transaction)
        changed = await within.execute(
            "DELETE FROM leases WHERE name = ? AND (owner = ? OR expires_at <= ?)",
            (name, self.owner, self._clock()),
        )
        return changed == 1

    def fence(self, name: str, *, release: bool = False) -> Fence:
        """A check for a write to the saga's journal, run in the write's own transaction: it
        renews the lease (or, with `release`, gives it up) and raises LeaseLost when the
        lease is another's, which rolls the write back. A holder that paused past its lease
        can then never record a step in the new holder's place (the fencing of a lease), and
        renewing costs no transaction of its own."""

        async def check(transaction: SqlTransaction) -> None:
            held = (
                await self.release(name, transaction)
                if release
                else await self.take(name, transaction)
            )
            if not held:
                raise LeaseLost(name)

        return check

    async def holder(self, name: str) -> str | None:
        """Who holds a lease that has not lapsed, or None."""
        row = await self._database.fetch_one(
            "SELECT owner FROM leases WHERE name = ? AND expires_at > ?",
            (name, self._clock()),
        )
        return None if row is None else str(row["owner"])
