"""The one small interface every store is written against, and the location that picks the
engine behind it: a path is a SQLite file (sqlite.py, the embedded default), a
`postgresql://` URL is a Postgres database (postgres.py).

The contract both engines keep, which the stores' guarantees rest on:

- `transaction()` is a write transaction that holds the database's write lock from its first
  statement to its commit (SQLite: BEGIN IMMEDIATE; Postgres: a transaction-scoped advisory
  lock). A read-check-write sequence inside one (an idempotency key looked up, then the
  effect and the key recorded) can therefore never interleave with another instance's, and
  rows numbered by the database (an event's `position`) commit in the order they were
  numbered, which is what lets an outbox relay read "everything after position N" without
  skipping a row that commits late.
- `snapshot()` is a read transaction that sees one consistent state and holds up no writer.
- `fetch_one`/`fetch_all` on the database run one query on its own.
- Statements use `?` placeholders and SQL that both engines speak (ON CONFLICT, not INSERT
  OR REPLACE); rows are read by column name or position.
- A constraint that refuses a statement raises IntegrityError; a database that cannot be
  reached raises DatabaseUnavailable, which a service answers with UNAVAILABLE naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

if TYPE_CHECKING:
    from meshkit.storage.schema import Schema

SqlParameters = Sequence[Any]
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Row(Protocol):
    """One row of a result: by column name or by position (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class Queries(Protocol):
    """Where reads run: an open transaction, or the database itself for a read that is one
    query (consistent on its own), which saves the round trips of BEGIN and COMMIT."""

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> Any: ...

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[Any]: ...


class SqlTransaction(Queries, Protocol):
    """The statements of one open transaction, valid only inside the block that opened it."""

    async def execute(self, sql: str, parameters: SqlParameters = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        ...

    async def execute_many(self, sql: str, rows: Iterable[SqlParameters]) -> None:
        """Run one statement once per row of parameters."""
        ...


class Database(Queries, Protocol):
    """A service's database, shared by its instances."""

    dialect: str
    """"sqlite" or "postgresql": which SQL the schema is rendered in."""
    name: str
    """What errors call it: the file's name, or the Postgres database's."""
    commits: int
    """Write transactions committed through this object (`foodmesh_db_commits_total`)."""

    def transaction(self) -> AbstractAsyncContextManager[SqlTransaction]: ...

    def snapshot(self) -> AbstractAsyncContextManager[SqlTransaction]: ...

    def after_commit(self, callback: Callable[[], None]) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class IntegrityError(Exception):
    """A constraint (a unique key, a check) refused a statement; the transaction is lost."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached (down, restarting, refusing connections)."""

    def __init__(self, name: str, reason: object) -> None:
        super().__init__(f"database {name!r} is unavailable: {reason}")
        self.name = name


def is_database_url(location: Path | str) -> bool:
    """Whether `location` is a Postgres URL rather than a SQLite file's path."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


async def open_database(location: Path | str, *, schema: Sequence[Schema] = ()) -> Database:
    """The database at `location` (a SQLite file's path, or a `postgresql://` URL), its
    schema migrated to the newest version of each of `schema`'s parts."""
    database: Database
    if is_database_url(location):
        from meshkit.storage.postgres import PostgresDatabase

        database = await PostgresDatabase.open(str(location))
    else:
        from meshkit.storage.sqlite import SqliteDatabase

        database = await SqliteDatabase.open(location)
    if schema:
        from meshkit.storage.schema import migrate

        try:
            await migrate(database, schema)
        except BaseException:
            await database.close()
            raise
    return database


class AsyncClosing:
    """`async with` support for anything with an async close()."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class DatabaseStore(AsyncClosing):
    """A service's store: it owns one Database and closes it with itself."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @property
    def database(self) -> Database:
        return self._database

    async def close(self) -> None:
        """Close the database connection."""
        await self._database.close()
