"""EventStore on a real SQLite file: appends at the stream's version only (StaleStream, with
nothing written, otherwise), two connections racing for one version with one winner, reads
in order with the types decoded, and a global position across streams."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue, Int64Value, StringValue

from meshkit.events import EventStore, StaleStream
from meshkit.events import store as event_store
from meshkit.storage.database import Database, open_database
from meshkit.storage.schema import Schema
from tests.conftest import Locate

STORE = EventStore([StringValue, Int64Value])


async def opened(location: Path | str) -> Database:
    return await open_database(location, schema=(event_store.SCHEMA,))


async def append(database: Database, stream: str, expected: int, *values: str | int) -> int:
    events = [StringValue(value=v) if isinstance(v, str) else Int64Value(value=v) for v in values]
    async with database.transaction() as transaction:
        return await STORE.append(transaction, stream, expected, events)


async def stored(database: Database, stream: str) -> list[str | int]:
    async with database.snapshot() as transaction:
        return [value_of(r.event) for r in await STORE.read(transaction, stream)]


def value_of(event: Message) -> str | int:
    assert isinstance(event, StringValue | Int64Value)
    return event.value


async def version(database: Database, stream: str) -> int:
    async with database.snapshot() as transaction:
        return await STORE.version(transaction, stream)


async def test_appends_start_at_zero_and_go_on_at_the_version_read(locate: Locate) -> None:
    async with await opened(locate("e")) as database:
        assert await version(database, "order-1") == 0
        assert await append(database, "order-1", 0, "placed") == 1
        assert await append(database, "order-1", 1, "paid", 42) == 3
        assert await version(database, "order-1") == 3
        assert await stored(database, "order-1") == ["placed", "paid", 42]


async def test_read_decodes_each_event_with_its_type_in_order(locate: Locate) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with await opened(locate("e")) as database:
        async with database.transaction() as transaction:
            await STORE.append(
                transaction, "s", 0, [Int64Value(value=7), StringValue(value="x")], now=at
            )
        async with database.snapshot() as transaction:
            recorded = await STORE.read(transaction, "s")
            assert await STORE.read(transaction, "unknown") == []
    assert [r.version for r in recorded] == [1, 2]
    assert [r.stream_id for r in recorded] == ["s", "s"]
    assert recorded[0].event == Int64Value(value=7)
    assert recorded[1].event == StringValue(value="x")
    assert [type(r.event) for r in recorded] == [Int64Value, StringValue]
    assert all(r.recorded_at == at for r in recorded)


@pytest.mark.parametrize("expected", [0, 1, 3, -1])
async def test_an_append_not_at_the_streams_version_is_stale_and_writes_nothing(
    locate: Locate, expected: int
) -> None:
    async with await opened(locate("e")) as database:
        await append(database, "s", 0, "a", "b")
        with pytest.raises(StaleStream) as raised:
            await append(database, "s", expected, "late", "later")
        assert raised.value.stream_id == "s" and raised.value.expected == expected
        assert await stored(database, "s") == ["a", "b"]
        assert await version(database, "s") == 2


async def test_a_stale_append_rolls_back_what_the_transaction_wrote_beside_it(
    locate: Locate,
) -> None:
    schema = (event_store.SCHEMA, Schema.of("views", "CREATE TABLE views (stream_id TEXT)"))
    async with await open_database(locate("e"), schema=schema) as database:
        await append(database, "s", 0, "a")
        with pytest.raises(StaleStream):
            async with database.transaction() as transaction:
                await transaction.execute("INSERT INTO views VALUES ('s')")
                await STORE.append(transaction, "s", 0, [StringValue(value="late")])
        assert await database.fetch_all("SELECT * FROM views") == []
        assert await stored(database, "s") == ["a"]


async def test_an_empty_append_checks_the_version_too(locate: Locate) -> None:
    async with await opened(locate("e")) as database:
        await append(database, "s", 0, "a")
        assert await append(database, "s", 1) == 1
        with pytest.raises(StaleStream):
            await append(database, "s", 0)


async def test_an_unknown_event_type_is_refused_before_anything_is_written(
    locate: Locate,
) -> None:
    async with await opened(locate("e")) as database:
        async with database.transaction() as transaction:
            with pytest.raises(TypeError, match=r"google\.protobuf\.BoolValue"):
                await STORE.append(
                    transaction, "s", 0, [StringValue(value="ok"), BoolValue(value=True)]
                )
            # The caller caught it and committed: still nothing of that append is stored.
        assert await version(database, "s") == 0


async def test_two_connections_racing_for_one_version_have_one_winner(locate: Locate) -> None:
    path = locate("e")
    async with await opened(path) as first, await opened(path) as second:
        await append(first, "s", 0, "placed")
        # Both instances read version 1, then both try to record their step at it.
        read = [await version(first, "s"), await version(second, "s")]
        assert read == [1, 1]
        results = await asyncio.gather(
            append(first, "s", 1, "first"),
            append(second, "s", 1, "second"),
            return_exceptions=True,
        )
        winners = [r for r in results if r == 2]
        losers = [r for r in results if isinstance(r, StaleStream)]
        assert len(winners) == 1 and len(losers) == 1, results
        events = await stored(second, "s")
        assert events[0] == "placed" and events[1:] in (["first"], ["second"])
        assert await version(first, "s") == 2


async def test_the_global_position_grows_across_streams(locate: Locate) -> None:
    async with await opened(locate("e")) as database:
        await append(database, "a", 0, "a1")
        await append(database, "b", 0, "b1", "b2")
        await append(database, "a", 1, "a2")
        rows = await database.fetch_all(
            "SELECT position, stream_id, version FROM events ORDER BY position"
        )
    assert [(r["stream_id"], r["version"]) for r in rows] == [
        ("a", 1),
        ("b", 1),
        ("b", 2),
        ("a", 2),
    ]
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions) and len(set(positions)) == 4


async def extend(database: Database, stream: str, expected: int, *values: str) -> list[str | int]:
    async with database.transaction() as transaction:
        recorded = await STORE.extend(
            transaction, stream, expected, [StringValue(value=v) for v in values]
        )
    return [value_of(r.event) for r in recorded]


async def test_extend_appends_and_returns_the_stream_as_a_read_gives_it(locate: Locate) -> None:
    async with await opened(locate("e")) as database:
        assert await extend(database, "s", 0, "placed") == ["placed"]
        async with database.transaction() as transaction:
            returned = await STORE.extend(
                transaction, "s", 1, [StringValue(value="paid"), StringValue(value="sent")]
            )
        assert await STORE.read(database, "s") == returned
        assert [r.version for r in returned] == [1, 2, 3]
        assert await extend(database, "s", 3) == ["placed", "paid", "sent"], "nothing to add"


@pytest.mark.parametrize("expected", [0, 1, 3])
async def test_extend_not_at_the_streams_version_is_stale_and_writes_nothing(
    locate: Locate, expected: int
) -> None:
    async with await opened(locate("e")) as database:
        await append(database, "s", 0, "a", "b")
        with pytest.raises(StaleStream):
            await extend(database, "s", expected, "late")
        assert await stored(database, "s") == ["a", "b"]


async def test_two_connections_extending_at_one_version_have_one_winner(locate: Locate) -> None:
    path = locate("e")
    async with await opened(path) as first, await opened(path) as second:
        await append(first, "s", 0, "placed")
        results = await asyncio.gather(
            extend(first, "s", 1, "first"), extend(second, "s", 1, "second"), return_exceptions=True
        )
        assert sorted(map(type, results), key=str) == sorted([list, StaleStream], key=str)
        assert await stored(second, "s") in (["placed", "first"], ["placed", "second"])
