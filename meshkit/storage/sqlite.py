"""Async access to one SQLite file that several service processes share.

Every instance of a service opens the same database file, so the file is the point where
instances agree: WAL mode lets readers run beside the one writer, a busy timeout makes a
writer wait for another process's write instead of failing at once, and `transaction()`
starts with BEGIN IMMEDIATE so that a read-check-write sequence (an idempotency key lookup
followed by an insert) holds the write lock from its first read: two processes can never both
see "absent" and both insert.

Which statements leave the event loop. Only the ones that wait: BEGIN IMMEDIATE when another
process holds the write lock (tried inline first; then on the thread, with SQLite's busy
handler, up to the busy timeout) and COMMIT (for the disk: the WAL's fsync, and a checkpoint
now and then) run on the connection's own thread; every other statement runs inline, with no
busy handler (a statement that found the file locked would fail at once rather than sleep on
the event loop). Inside a write transaction nothing waits (this connection holds the lock), and in
WAL mode a reader takes a snapshot without waiting for writers; the statements of these
stores are key lookups and short inserts of tens of microseconds. That is why this is not
aiosqlite, the well-kept library for the job, which moves every statement to its thread: a
round trip to a thread costs about 135 us of CPU on the machine the benchmarks run on (an
event loop wake-up and a thread wake-up), several times the statement itself, and a
checkout's write path made 35 of them (scripts/bench_checkout.py prints the CPU per call).
The cost of inline statements is that a slow one (a scan of a large table, or a reader
arriving during a WAL recovery after a crash) holds up the event loop: stores keep to indexed
lookups.

One `SqliteDatabase` is one connection; an asyncio lock serialises its users so that one
coroutine's statements never land inside another coroutine's transaction, and a statement on
the thread is always waited out (even by a cancelled caller) before the next one runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

from meshkit.storage.database import AsyncClosing, IntegrityError, SqlParameters

DEFAULT_BUSY_TIMEOUT_S = 10.0
T = TypeVar("T")


class SqliteTransaction:
    """The statements of one open transaction; valid only inside a `SqliteDatabase`'s
    `transaction()` or `snapshot()`."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    async def execute(self, sql: str, parameters: SqlParameters = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        try:
            cursor = self._connection.execute(sql, parameters)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    async def execute_many(self, sql: str, rows: Iterable[SqlParameters]) -> None:
        """Run one statement once per row of parameters."""
        try:
            self._connection.executemany(sql, rows).close()
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> sqlite3.Row | None:
        """The first row of a query, or None."""
        rows = await self.fetch_all(sql, parameters)
        return rows[0] if rows else None

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[sqlite3.Row]:
        """All rows of a query."""
        cursor = self._connection.execute(sql, parameters)
        try:
            rows: list[sqlite3.Row] = cursor.fetchall()
            return rows
        finally:
            cursor.close()


class SqliteDatabase(AsyncClosing):
    """One connection to a shared SQLite file, in WAL mode, with foreign keys enforced."""

    dialect = "sqlite"

    def __init__(
        self,
        connection: sqlite3.Connection,
        thread: ThreadPoolExecutor,
        path: Path,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        self._connection = connection
        self._thread = thread
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._statements = SqliteTransaction(connection)
        self._lock = asyncio.Lock()
        self.path = path
        self.name = path.name
        self.commits = 0
        """Write transactions committed through this connection (a cost per request that
        the benchmarks report, and the `foodmesh_db_commits_total` metric)."""
        self._after_commit: list[Callable[[], None]] = []

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> Self:
        """Open (or create) the file (meshkit.storage.database.open_database also migrates
        its schema)."""
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite {Path(path).name}")
        loop = asyncio.get_running_loop()
        try:
            # isolation_level=None: sqlite3 issues no implicit BEGIN/COMMIT; transaction()
            # does. check_same_thread=False: the lock, not the thread, keeps users apart.
            connection = await loop.run_in_executor(
                thread,
                lambda: sqlite3.connect(
                    path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
                ),
            )
        except BaseException:
            thread.shutdown(wait=False)
            raise
        database = cls(connection, thread, Path(path), busy_timeout_s)
        try:
            connection.row_factory = sqlite3.Row
            # No waiting inline: a statement that finds the file locked fails at once, and
            # only BEGIN IMMEDIATE, which can, waits (on the thread: _begin_waiting).
            database._run("PRAGMA busy_timeout = 0")
            await database._enable_wal(busy_timeout_s)
            database._run("PRAGMA foreign_keys = ON")
        except BaseException:
            await database.close()
            raise
        return database

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """A write transaction (BEGIN IMMEDIATE): committed when the block ends, rolled back
        when it raises. Other processes' writers wait (up to the busy timeout) until it ends."""
        async with self._lock:
            try:
                await self._begin_immediate()
                yield self._statements
                await self._waiting(self._run, "COMMIT")
            except BaseException:
                self._rollback_if_open()
                raise
        self.commits += 1
        for callback in self._after_commit:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every write transaction this connection commits (an outbox
        relay wakes up: there may be new events)."""
        self._after_commit.append(callback)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SqliteTransaction]:
        """A read transaction (BEGIN DEFERRED): its queries see one consistent state of the file
        and do not hold up writers (WAL)."""
        async with self._lock:
            self._run("BEGIN DEFERRED")
            try:
                yield self._statements
                self._run("COMMIT")  # a reader's: nothing to write
            except BaseException:
                self._rollback_if_open()
                raise

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> sqlite3.Row | None:
        """The first row of a single query, run on its own."""
        async with self._lock:
            return await self._statements.fetch_one(sql, parameters)

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[sqlite3.Row]:
        """All rows of a single query, run on its own."""
        async with self._lock:
            return await self._statements.fetch_all(sql, parameters)

    async def close(self) -> None:
        """Close the connection and stop its thread."""
        async with self._lock:
            try:
                await self._waiting(self._connection.close)
            finally:
                self._thread.shutdown(wait=False)

    async def _waiting(self, statement: Callable[..., T], *args: Any) -> T:
        """Run a statement that may wait on the connection's thread. A caller cancelled
        meanwhile still waits for it to end (it cannot be stopped, and the connection is not
        free before), then sees the cancellation."""
        future = asyncio.get_running_loop().run_in_executor(self._thread, statement, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:
                    pass
            if not future.cancelled():
                future.exception()  # retrieved: the cancellation is what the caller sees
            raise

    async def _begin_immediate(self) -> None:
        """Take the write lock: inline when it is free (the usual case: no trip to the thread),
        on the thread with the busy timeout when another process holds it."""
        try:
            self._run("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await self._waiting(self._begin_waiting)

    def _begin_waiting(self) -> None:
        """BEGIN IMMEDIATE with SQLite's busy handler on (it sleeps and tries again until the
        busy timeout); on the connection's thread."""
        self._run(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        try:
            self._run("BEGIN IMMEDIATE")
        finally:
            self._run("PRAGMA busy_timeout = 0")

    async def _enable_wal(self, busy_timeout_s: float) -> None:
        """Switch the file to WAL mode, retrying with backoff while another process does the
        same.

        SQLite may answer SQLITE_BUSY to a journal-mode change at once, without calling the
        busy handler, when another connection is converting the same new file; the busy
        timeout does not cover it, so the retry lives here.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + busy_timeout_s
        delay = 0.005
        while True:
            try:
                await self._waiting(self._run, "PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _run(self, sql: str) -> None:
        """One statement whose rows nobody reads, its cursor closed at once: a cursor left
        open keeps its statement in progress, and COMMIT refuses to run beside one."""
        self._connection.execute(sql).close()

    def _rollback_if_open(self) -> None:
        if self._connection.in_transaction:
            try:
                self._run("ROLLBACK")
            except sqlite3.OperationalError as exc:
                # A COMMIT that failed may have ended the transaction itself.
                if "no transaction is active" not in str(exc):
                    raise
