"""One schema definition for both engines, and versioned migrations run at start.

A store's schema is made of parts (`Schema`): its own tables, and those of the building blocks
it uses (the event store, the outbox relay, leases, idempotency keys, an inbox), each part with
its own numbered migrations, the way Django numbers each app's. `migrate()` runs, in one write
transaction, the migrations that the database's `schema_migrations` table does not list yet,
and lists them; the write transaction holds the database's write lock (SQLite: BEGIN
IMMEDIATE; Postgres: an advisory lock), so instances that start together migrate one after
the other and the later ones find nothing left to do.

Tables and indexes are SQLAlchemy Core objects (`sqlalchemy.Table`), rendered for the
database's dialect: one definition gives SQLite's `INTEGER PRIMARY KEY` and `BLOB` and
Postgres's `BIGSERIAL` and `BYTEA`. SQLAlchemy is here for that (DDL compiled per dialect, the
well-kept way to write one schema for two engines); statements run through the stores' own
drivers (sqlite3 inline, asyncpg), so the cost per call is theirs. Alembic, SQLAlchemy's
migration tool, was not taken: its migrations are scripts of one linear history per database,
and here one database holds several independently versioned parts that the services compose.

Every step is idempotent (CREATE ... IF NOT EXISTS; AddColumn looks first), so a SQLite file
made before the migrations were numbered is brought up to date by running them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from meshkit.storage.database import Database, SqlTransaction

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""An integer column: BIGINT on Postgres, INTEGER on SQLite (where only INTEGER makes a
primary key the rowid that the database numbers itself)."""

_DIALECTS: dict[str, Dialect] = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
}

MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    part TEXT NOT NULL,
    version INTEGER NOT NULL,
    applied_at TEXT NOT NULL,
    PRIMARY KEY (part, version)
)"""


@dataclass(frozen=True, slots=True)
class AddColumn:
    """A column added to a table made before the column existed."""

    table: str
    column: str
    type: sa.types.TypeEngine[Any]


Step = sa.Table | sa.Index | AddColumn | str
"""What a migration does: create a table (with its indexes) or an index, add a column, or run a
statement written in SQL both engines speak (idempotent, like the others)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered change of a part's schema."""

    version: int
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Schema:
    """A part of a database's schema (`name`, e.g. "events"), with its migrations, numbered
    1, 2, ... in the order they are applied."""

    name: str
    migrations: tuple[Migration, ...]

    def __post_init__(self) -> None:
        versions = [m.version for m in self.migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"schema {self.name!r}: migrations must be numbered 1..n: {versions}")

    @classmethod
    def of(cls, name: str, *steps: Step) -> Schema:
        """A part whose schema is one migration (version 1)."""
        return cls(name, (Migration(1, steps),))


async def migrate(database: Database, parts: Sequence[Schema]) -> list[tuple[str, int]]:
    """Apply the migrations of `parts` that `database` has not had yet, in one write
    transaction; the (part, version) pairs applied."""
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"schema parts named twice: {names}")
    dialect = _DIALECTS[database.dialect]
    applied: list[tuple[str, int]] = []
    async with database.transaction() as transaction:
        await transaction.execute(MIGRATIONS_TABLE)
        rows = await transaction.fetch_all("SELECT part, version FROM schema_migrations")
        done = {(row["part"], row["version"]) for row in rows}
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        for part in parts:
            for migration in part.migrations:
                if (part.name, migration.version) in done:
                    continue
                for step in migration.steps:
                    await _apply(transaction, step, dialect)
                await transaction.execute(
                    "INSERT INTO schema_migrations (part, version, applied_at) VALUES (?, ?, ?)",
                    (part.name, migration.version, stamp),
                )
                applied.append((part.name, migration.version))
    return applied


def ddl(step: Step, dialect_name: str) -> list[str]:
    """The statements of a step that needs no look at the database, in a dialect's SQL."""
    dialect = _DIALECTS[dialect_name]
    if isinstance(step, sa.Table):
        indexes = sorted(step.indexes, key=lambda index: str(index.name))
        return [
            str(CreateTable(step, if_not_exists=True).compile(dialect=dialect)).strip(),
            *(str(CreateIndex(i, if_not_exists=True).compile(dialect=dialect)) for i in indexes),
        ]
    if isinstance(step, sa.Index):
        return [str(CreateIndex(step, if_not_exists=True).compile(dialect=dialect))]
    if isinstance(step, AddColumn):
        declaration = step.type.compile(dialect=dialect)
        return [f"ALTER TABLE {step.table} ADD COLUMN IF NOT EXISTS {step.column} {declaration}"]
    return [step]


async def _apply(transaction: SqlTransaction, step: Step, dialect: Dialect) -> None:
    if isinstance(step, AddColumn) and dialect.name == "sqlite":
        # SQLite has no ADD COLUMN IF NOT EXISTS: look first.
        columns = await transaction.fetch_all(f"PRAGMA table_info({step.table})")
        if all(row["name"] != step.column for row in columns):
            declaration = step.type.compile(dialect=dialect)
            await transaction.execute(
                f"ALTER TABLE {step.table} ADD COLUMN {step.column} {declaration}"
            )
        return
    for statement in ddl(step, dialect.name):
        await transaction.execute(statement)


def partial_index(where: str) -> dict[str, Any]:
    """The keyword arguments of an `sa.Index` on the rows that match `where` (SQL both
    engines speak), for each dialect."""
    return {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)}
