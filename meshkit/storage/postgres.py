"""A service's database on Postgres (`--database-url postgresql://...` or DATABASE_URL), behind
the same interface as the SQLite file (meshkit.storage.database), through asyncpg.

Why asyncpg: it is the well-kept asyncio driver for Postgres, speaks the binary protocol and
prepares each statement once per connection (the stores' statements are few and repeated), and
its pool replaces a connection that broke with a new one at the next acquire, which is how a
service gets through a Postgres restart by itself. SQLAlchemy's asyncio layer would sit on
asyncpg and add its own per-statement cost; the schema's DDL is all that comes from
SQLAlchemy (meshkit.storage.schema).

Writers: every `transaction()` takes one transaction-scoped advisory lock of the database
(`pg_advisory_xact_lock`) before its first statement, the way SQLite's BEGIN IMMEDIATE takes
the file's write lock. That keeps, word for word, the guarantees the stores were written
against: a read-check-write in one transaction (an idempotency key, a lease, an inbox entry)
never interleaves with another instance's, and the event positions that BIGSERIAL hands out
commit in order, so the outbox relay, which reads everything after the last position it
published, never passes over an event that commits late (with concurrent writers, position 7
can commit after position 8 has been read). Readers (`snapshot()`, single queries) take no lock
and run beside the writer, as in WAL mode. Each service has its own database, so the lock is
per service.

Statements keep the `?` placeholders of the stores' SQL; they become asyncpg's `$1, $2, ...`
once per distinct statement. Errors: a constraint -> IntegrityError, a connection that
cannot be made or was lost -> DatabaseUnavailable naming the database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Self
from urllib.parse import urlsplit

import asyncpg

from meshkit.storage.database import (
    AsyncClosing,
    DatabaseUnavailable,
    IntegrityError,
    SqlParameters,
)

log = logging.getLogger(__name__)

WRITE_LOCK = 0x666F6F64
"""The advisory lock a write transaction holds (per database: advisory locks are)."""
_BEGIN_WRITE = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
DEFAULT_POOL_SIZE = 10
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_START_TIMEOUT_S = 30.0

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    asyncpg.PostgresConnectionError,  # class 08: the connection broke
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutting down, starting up
    asyncpg.InterfaceError,  # "connection is closed", a pool that is closing
    asyncpg.exceptions.InternalClientError,  # a protocol left mid-operation by a lost server
    asyncio.TimeoutError,  # a connection attempt that got no answer
)


@functools.lru_cache(maxsize=1024)
def numbered_placeholders(sql: str) -> str:
    """`sql` with each `?` outside quotes as `$1`, `$2`, ... (asyncpg's placeholders)."""
    out: list[str] = []
    number = 0
    quote: str | None = None
    for char in sql:
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(char)
    return "".join(out)


def _rowcount(status: str) -> int:
    """The rows a statement changed, from its command tag ("UPDATE 2", "INSERT 0 1")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresTransaction:
    """The statements of one open transaction on one connection."""

    def __init__(self, connection: asyncpg.Connection, name: str) -> None:
        self._connection = connection
        self._name = name

    async def execute(self, sql: str, parameters: SqlParameters = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        with _translated(self._name):
            if parameters:
                status = await self._connection.execute(numbered_placeholders(sql), *parameters)
            else:
                status = await self._connection.execute(sql)
        return _rowcount(status)

    async def execute_many(self, sql: str, rows: Iterable[SqlParameters]) -> None:
        """Run one statement once per row of parameters."""
        with _translated(self._name):
            await self._connection.executemany(numbered_placeholders(sql), rows)

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> Any:
        """The first row of a query, or None."""
        with _translated(self._name):
            return await self._connection.fetchrow(numbered_placeholders(sql), *parameters)

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[Any]:
        """All rows of a query."""
        with _translated(self._name):
            rows: list[Any] = await self._connection.fetch(numbered_placeholders(sql), *parameters)
            return rows


class PostgresDatabase(AsyncClosing):
    """A pool of connections to one service's Postgres database."""

    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool, name: str) -> None:
        self._pool = pool
        self.name = name
        self.commits = 0
        self._after_commit: list[Callable[[], None]] = []

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> Self:
        """Connect to the database at `url`, waiting (with backoff, up to `start_timeout_s`)
        while it cannot be reached yet: a service may start before its database does."""
        name = urlsplit(url).path.lstrip("/") or "postgres"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + start_timeout_s
        delay = 0.1
        while True:
            try:
                with _translated(name):
                    pool = await asyncpg.create_pool(
                        url,
                        min_size=1,
                        max_size=pool_size,
                        timeout=connect_timeout_s,
                        reset=_nothing_to_reset,
                    )
                break
            except DatabaseUnavailable as exc:
                if loop.time() + delay > deadline:
                    raise
                log.warning("%s; trying again in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        assert pool is not None
        return cls(pool, name)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTransaction]:
        """A write transaction holding the database's write lock: committed when the block
        ends, rolled back when it raises."""
        async with self._within(_BEGIN_WRITE) as statements:
            yield statements
        self.commits += 1
        for callback in self._after_commit:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every write transaction committed through this pool."""
        self._after_commit.append(callback)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[PostgresTransaction]:
        """A read-only transaction that sees one state of the database (REPEATABLE READ) and
        holds up no writer."""
        async with self._within(_BEGIN_SNAPSHOT) as statements:
            yield statements

    @asynccontextmanager
    async def _within(self, begin: str) -> AsyncIterator[PostgresTransaction]:
        """A transaction begun by `begin` on a connection of the pool: committed when the
        block ends, rolled back when it raises. BEGIN (and the write lock) go in one round
        trip, as one simple query; asyncpg's Transaction object would spend one on each."""
        async with self._connection() as connection:
            with _translated(self.name):
                await connection.execute(begin)
            try:
                yield PostgresTransaction(connection, self.name)
            except BaseException:
                await _rollback(connection)
                raise
            with _translated(self.name):
                await connection.execute("COMMIT")

    async def fetch_one(self, sql: str, parameters: SqlParameters = ()) -> Any:
        """The first row of a single query, run on its own."""
        async with self._connection() as connection:
            return await PostgresTransaction(connection, self.name).fetch_one(sql, parameters)

    async def fetch_all(self, sql: str, parameters: SqlParameters = ()) -> list[Any]:
        """All rows of a single query, run on its own."""
        async with self._connection() as connection:
            return await PostgresTransaction(connection, self.name).fetch_all(sql, parameters)

    async def close(self) -> None:
        """Close the pool's connections (waiting for the ones in use, briefly)."""
        try:
            await asyncio.wait_for(self._pool.close(), timeout=5)
        except _UNAVAILABLE:  # TimeoutError among them
            self._pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        with _translated(self.name):
            connection = await self._pool.acquire()
        try:
            yield connection
        finally:
            try:
                await self._pool.release(connection)
            except Exception:
                # A connection that could not be reset is terminated by the pool, which
                # makes a new one at the next acquire.
                log.debug("a broken connection to %s was dropped", self.name, exc_info=True)


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """The pool's reset of a connection given back: asyncpg's own rolls back a transaction
    left open (and that stays), then runs RESET ALL, UNLISTEN and the like, one round trip at
    every release; these connections set no session state, so that trip is skipped."""


async def _rollback(connection: asyncpg.Connection) -> None:
    """Roll back what is left of a failed transaction. It may be gone already (the failed
    statement ended it, or the connection broke, leaving asyncpg's protocol mid-operation):
    then the connection is not reused as it is (the pool resets or drops it), and the error
    the caller sees stays the one that failed the transaction."""
    if not connection.is_in_transaction():
        return
    try:
        await connection.execute("ROLLBACK")
    except Exception:
        log.debug("rollback failed", exc_info=True)


@contextmanager
def _translated(name: str) -> Iterator[None]:
    """asyncpg's errors as the interface's: IntegrityError, DatabaseUnavailable."""
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(str(exc)) from exc
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(name, exc) from exc
