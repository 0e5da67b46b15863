"""SqliteDatabase on a real file, with another process's write lock played by a second plain
sqlite3 connection: statements that wait do so off the event loop, a cancelled caller leaves
the connection clean, reads do not wait for writers, and the rows changed are counted."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from meshkit.storage.schema import Schema, migrate
from meshkit.storage.sqlite import SqliteDatabase

SCHEMA = (
    Schema.of(
        "notes", "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"
    ),
)
WAIT_S = 10.0


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    async with await SqliteDatabase.open(tmp_path / "notes.db") as db:
        await migrate(db, SCHEMA)
        yield db


@pytest.fixture
def other_process(database: SqliteDatabase) -> Iterator[sqlite3.Connection]:
    """Another writer of the same file, holding its write lock until it commits."""
    connection = sqlite3.connect(database.path, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("INSERT INTO notes (body) VALUES ('theirs')")
    try:
        yield connection
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


async def notes(database: SqliteDatabase) -> list[str]:
    return [row["body"] for row in await database.fetch_all("SELECT body FROM notes ORDER BY id")]


async def test_execute_counts_the_rows_a_statement_changed(database: SqliteDatabase) -> None:
    async with database.transaction() as transaction:
        assert await transaction.execute("INSERT INTO notes (body) VALUES ('a'), ('b')") == 2
        assert await transaction.execute("UPDATE notes SET body = 'c' WHERE body = 'a'") == 1
        assert await transaction.execute("DELETE FROM notes WHERE body = 'none'") == 0
    assert await notes(database) == ["c", "b"]
    assert database.commits == 2, "the schema's transaction and this one"


async def test_a_writer_waits_for_anothers_lock_without_holding_up_the_loop(
    database: SqliteDatabase, other_process: sqlite3.Connection
) -> None:
    ticks = 0
    entered = asyncio.Event()

    async def write() -> None:
        async with database.transaction() as transaction:
            entered.set()
            await transaction.execute("INSERT INTO notes (body) VALUES ('ours')")

    writing = asyncio.create_task(write())
    while ticks < 20:  # the loop runs while the writer waits for the lock
        await asyncio.sleep(0.005)
        ticks += 1
    assert not entered.is_set(), "the other process still holds the write lock"
    other_process.execute("COMMIT")
    await asyncio.wait_for(writing, WAIT_S)
    assert await notes(database) == ["theirs", "ours"]


async def test_a_reader_does_not_wait_for_a_writer(
    database: SqliteDatabase, other_process: sqlite3.Connection
) -> None:
    assert await asyncio.wait_for(notes(database), 1.0) == [], "their row is not committed"
    async with database.snapshot() as snapshot:
        assert await snapshot.fetch_all("SELECT * FROM notes") == []
    other_process.execute("COMMIT")
    assert await notes(database) == ["theirs"]


async def test_a_caller_cancelled_while_waiting_for_the_lock_leaves_the_connection_clean(
    database: SqliteDatabase, other_process: sqlite3.Connection
) -> None:
    async def write(body: str) -> None:
        async with database.transaction() as transaction:
            await transaction.execute("INSERT INTO notes (body) VALUES (?)", (body,))

    cancelled = asyncio.create_task(write("cancelled"))
    await asyncio.sleep(0)  # it runs up to its first wait: BEGIN, on the connection's thread
    cancelled.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not cancelled.done(), "the wait for the lock is waited out, not abandoned"
    other_process.execute("COMMIT")
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(cancelled, WAIT_S)

    await asyncio.wait_for(write("next"), WAIT_S)
    assert await notes(database) == ["theirs", "next"], "nothing of the cancelled one"


async def test_a_write_lock_held_past_the_busy_timeout_is_an_error_and_rolls_nothing_in(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.db"
    async with await SqliteDatabase.open(path, busy_timeout_s=0.1) as database:
        await migrate(database, SCHEMA)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                async with database.transaction() as transaction:
                    await transaction.execute("INSERT INTO notes (body) VALUES ('late')")
        finally:
            other.execute("ROLLBACK")
            other.close()
        async with database.transaction() as transaction:
            await transaction.execute("INSERT INTO notes (body) VALUES ('after')")
        assert await notes(database) == ["after"]
