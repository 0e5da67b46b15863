"""Async access to one SQLite file that several service processes share.

Every instance of a service opens the same database file, so the file is the point where
instances agree: WAL mode lets readers run beside the one writer, a busy timeout makes a
writer wait for another process's write instead of failing at once, and `transaction()`
starts with BEGIN IMMEDIATE so that a read-check-write sequence (an idempotency key lookup
followed by an insert) holds the write lock from its first read: two processes can never both
see "absent" and both insert.

aiosqlite runs each statement on a worker thread, so waiting for the lock never blocks the
event loop. One `SqliteDatabase` is one connection; an asyncio lock serialises its users so
that one coroutine's statements never land inside another coroutine's transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiosqlite

SqlParameters = Sequence[Any]
DEFAULT_BUSY_TIMEOUT_S = 10.0


class Queries(Protocol):
    """Where reads run: an open transaction, or the database itself for a read that is one
    query (consistent on its own), which saves the round trips of BEGIN and COMMIT."""

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> sqlite3.Row | None:
        ...

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[sqlite3.Row]:
        ...


class SqlTransaction:
    """The statements of one open transaction; valid only inside `SqliteDatabase.transaction()`."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    async def execute(self, sql: str, parameters: SqlParameters = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        # One trip to aiosqlite's thread, not two (execute, then closing its cursor): the
        # rows changed are the connection's running count before and after, which nothing
        # else moves meanwhile, since SqliteDatabase lets one coroutine use the connection.
        before = self._connection.total_changes
        await self._connection.execute_fetchall(sql, parameters)
        return self._connection.total_changes - before

    async def execute_many(self, sql: str, rows: Iterable[SqlParameters]) -> None:
        """Run one statement once per row of parameters."""
        cursor = await self._connection.executemany(sql, rows)
        await cursor.close()

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> sqlite3.Row | None:
        """The first row of a query, or None."""
        rows = await self.fetch_all(sql, parameters)
        return rows[0] if rows else None

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[sqlite3.Row]:
        """All rows of a query."""
        return list(await self._connection.execute_fetchall(sql, parameters))


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


class SqliteDatabase(AsyncClosing):
    """One connection to a shared SQLite file, in WAL mode, with foreign keys enforced."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._connection = connection
        self._statements = SqlTransaction(connection)
        self._lock = asyncio.Lock()
        self.path = path
        self.commits = 0
        """Write transactions committed through this connection (a cost per request that
        the benchmarks report, and the `foodmesh_db_commits_total` metric)."""

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        schema: Sequence[str] = (),
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> Self:
        """Open (or create) the file and run the schema statements, which must be idempotent
        (CREATE ... IF NOT EXISTS), in one write transaction."""
        # isolation_level=None: sqlite3 issues no implicit BEGIN/COMMIT; transaction() does.
        connection = await aiosqlite.connect(path, timeout=busy_timeout_s, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            await connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            await _enable_wal(connection, busy_timeout_s)
            await connection.execute("PRAGMA foreign_keys = ON")
            database = cls(connection, Path(path))
            if schema:
                async with database.transaction() as transaction:
                    for statement in schema:
                        await transaction.execute(statement)
        except BaseException:
            await connection.close()
            raise
        return database

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        """A write transaction (BEGIN IMMEDIATE): committed when the block ends, rolled back
        when it raises. Other processes' writers wait (up to the busy timeout) until it ends."""
        async with self._begin("BEGIN IMMEDIATE") as transaction:
            yield transaction
        self.commits += 1

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SqlTransaction]:
        """A read transaction (BEGIN DEFERRED): its queries see one consistent state of the file
        and do not hold up writers (WAL)."""
        async with self._begin("BEGIN DEFERRED") as transaction:
            yield transaction

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> sqlite3.Row | None:
        """The first row of a single query, run on its own."""
        async with self._lock:
            return await self._statements.fetch_one(sql, parameters)

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[sqlite3.Row]:
        """All rows of a single query, run on its own."""
        async with self._lock:
            return await self._statements.fetch_all(sql, parameters)

    async def close(self) -> None:
        """Close the connection and stop its worker thread."""
        async with self._lock:
            await self._connection.close()

    @asynccontextmanager
    async def _begin(self, begin_statement: str) -> AsyncIterator[SqlTransaction]:
        async with self._lock:
            await self._statements.execute(begin_statement)
            try:
                yield self._statements
                await self._statements.execute("COMMIT")
            except BaseException:
                # Shielded: a second cancellation must not leave the connection mid-transaction.
                await asyncio.shield(self._rollback_if_open())
                raise

    async def _rollback_if_open(self) -> None:
        if self._connection.in_transaction:
            try:
                await self._statements.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                # Cancelled during COMMIT: the worker thread may still have committed.
                if "no transaction is active" not in str(exc):
                    raise


async def _enable_wal(connection: aiosqlite.Connection, busy_timeout_s: float) -> None:
    """Switch the file to WAL mode, retrying with backoff while another process does the same.

    SQLite may answer SQLITE_BUSY to a journal-mode change at once, without calling the busy
    handler, when another connection is converting the same new file; the busy timeout does
    not cover it, so the retry lives here.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_timeout_s
    delay = 0.005
    while True:
        try:
            await connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


class DatabaseStore(AsyncClosing):
    """A service's store: it owns one SqliteDatabase and closes it with itself."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database

    @property
    def database(self) -> SqliteDatabase:
        return self._database

    async def close(self) -> None:
        """Close the database connection."""
        await self._database.close()
