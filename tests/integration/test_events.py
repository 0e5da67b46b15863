"""The outbox relay and the inbox consumer against a real nats-server with JetStream (started on
a free port, its store in the test's directory), on a real database: a SQLite file, and a
Postgres database (each test runs on both).

What is counted is what reached the broker's stream (its messages and their headers) and what
the consumer's database holds, never what the code says it did.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from foodmesh.orders.v1 import events_pb2
from meshkit.events import (
    DEAD_LETTERS,
    Broker,
    EventConsumer,
    EventStore,
    OutboxRelay,
    ReceivedEvent,
    RetryLater,
    context_stream,
    inbox,
    relay,
)
from meshkit.events import store as event_store
from meshkit.storage import lease
from meshkit.storage.database import Database, SqlTransaction, open_database
from meshkit.storage.lease import Leases
from meshkit.storage.schema import Schema
from scripts.nats_server import NatsServer
from tests.conftest import Locate

ORDERS = context_stream("orders")
TYPES = (events_pb2.OrderPlaced, events_pb2.OrderConfirmed)
SCHEMA = (
    event_store.SCHEMA,
    lease.SCHEMA,
    relay.SCHEMA,
    inbox.SCHEMA,
    Schema.of(
        "effects", "CREATE TABLE IF NOT EXISTS effects (event_id TEXT, order_id TEXT, kind TEXT)"
    ),
)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    root = tmp_path_factory.mktemp("nats")
    with NatsServer(store_dir=root / "store", log_path=root / "nats.log") as server:
        yield server


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A plain client of the test's own, with the streams empty."""
    client = await nats.connect(nats_server.url)
    context = client.jetstream()
    for spec in (ORDERS, DEAD_LETTERS):
        try:
            await context.delete_stream(spec.name)
        except nats.js.errors.NotFoundError:
            pass
    try:
        yield context
    finally:
        await client.close()


@pytest.fixture
async def database(locate: Locate) -> AsyncIterator[Database]:
    async with await open_database(locate("orders"), schema=SCHEMA) as db:
        yield db


async def record(database: Database, order_id: str, *events: object) -> None:
    store = EventStore(TYPES)
    async with database.transaction() as transaction:
        await store.append_next(transaction, order_id, list(events))  # type: ignore[arg-type]


async def stream_messages(js: JetStreamContext, stream: str = "ORDERS") -> list[nats.aio.msg.Msg]:
    """Every message of the stream, in stream order."""
    info = await js.stream_info(stream)
    return [
        await js.get_msg(stream, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
        if info.state.messages
    ]


def placed(order_id: str) -> events_pb2.OrderPlaced:
    return events_pb2.OrderPlaced(order_id=order_id, customer_id="ada")


async def until(predicate: object, timeout: float = 10.0, message: str = "condition") -> None:
    """Poll an async predicate until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(message)
        await asyncio.sleep(0.02)


async def test_the_relay_publishes_each_event_once_in_commit_order_as_cloudevents(
    js: JetStreamContext, nats_server: NatsServer, database: Database
) -> None:
    for n in range(5):
        await record(
            database, f"o-{n}", placed(f"o-{n}"), events_pb2.OrderConfirmed(order_id=f"o-{n}")
        )
    broker = Broker(nats_server.url, "test relay")
    relay_ = OutboxRelay(database, Leases(database, "a"), broker, context="orders")
    task = asyncio.create_task(relay_.run())
    try:
        await until(lambda: _count(js, 10), message="10 events in ORDERS")
        messages = await stream_messages(js)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay_.close()
        await broker.close()

    assert [(m.subject, m.headers["ce-subject"]) for m in messages] == [
        pair
        for n in range(5)
        for pair in (
            ("orders.events.OrderPlaced", f"o-{n}"),
            ("orders.events.OrderConfirmed", f"o-{n}"),
        )
    ]
    first = messages[0].headers
    assert first["ce-specversion"] == "1.0"
    assert first["ce-type"] == "foodmesh.orders.v1.OrderPlaced"
    assert first["ce-source"] == "/foodmesh/orders"
    assert first["ce-id"] == first["Nats-Msg-Id"] == "o-0:1"
    assert first["content-type"] == "application/protobuf"
    assert events_pb2.OrderPlaced.FromString(messages[0].data).order_id == "o-0"
    cursor = await database.fetch_one("SELECT position FROM outbox_cursors")
    assert cursor is not None and cursor["position"] == 10


async def _count(js: JetStreamContext, expected: int, stream: str = "ORDERS") -> bool:
    try:
        return (await js.stream_info(stream)).state.messages >= expected
    except nats.js.errors.NotFoundError:
        return False


async def test_a_relay_that_publishes_again_after_a_crash_doubles_nothing(
    js: JetStreamContext, nats_server: NatsServer, database: Database
) -> None:
    """The crash between PubAck and the cursor's write: the cursor is still at 0, so the next
    relay publishes everything again; JetStream's deduplication keeps one copy of each."""
    for n in range(3):
        await record(database, f"o-{n}", placed(f"o-{n}"))
    broker = Broker(nats_server.url, "test relay")
    try:
        first = OutboxRelay(
            database, Leases(database, "a"), broker, context="orders", mark_interval=3600
        )
        assert await first.relay_batch() == 3  # published, cursor not written: the "crash"
        again = OutboxRelay(database, Leases(database, "a"), broker, context="orders")
        assert await again.relay_batch() == 3
    finally:
        await broker.close()
    messages = await stream_messages(js)
    assert [m.headers["ce-id"] for m in messages] == ["o-0:1", "o-1:1", "o-2:1"]


async def test_two_relays_on_one_database_publish_each_event_once_in_order(
    js: JetStreamContext, nats_server: NatsServer, database: Database, locate: Locate
) -> None:
    async with await open_database(locate("orders")) as other:
        brokers = [Broker(nats_server.url, f"relay {n}") for n in range(2)]
        relays = [
            OutboxRelay(db, Leases(db, owner), b, context="orders")
            for db, owner, b in zip((database, other), ("a", "b"), brokers, strict=True)
        ]
        tasks = [asyncio.create_task(r.run()) for r in relays]
        try:
            for n in range(40):
                await record(database if n % 2 else other, f"o-{n % 4}", placed(f"o-{n}"))
            await until(lambda: _count(js, 40), message="40 events in ORDERS")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for r in relays:
                await r.close()
            for b in brokers:
                await b.close()
    messages = await stream_messages(js)
    assert len(messages) == 40
    by_order: dict[str, list[int]] = {}
    for m in messages:
        stream_id, version = m.headers["ce-id"].split(":")
        by_order.setdefault(stream_id, []).append(int(version))
    assert by_order == {f"o-{k}": list(range(1, 11)) for k in range(4)}
    assert sorted(r.published for r in relays) == [0, 40]  # one leader did it all


async def test_the_outbox_drains_by_itself_after_the_broker_was_down(
    database: Database, tmp_path: Path
) -> None:
    with NatsServer(store_dir=tmp_path / "store", log_path=tmp_path / "nats.log") as nats_server:
        await _drain_after_outage(nats_server, database)


async def _drain_after_outage(nats_server: NatsServer, database: Database) -> None:
    broker = Broker(nats_server.url, "test relay")
    relay_ = OutboxRelay(
        database, Leases(database, "a"), broker, context="orders", publish_timeout=0.5
    )
    task = asyncio.create_task(relay_.run())
    try:
        await record(database, "o-0", placed("o-0"))
        first = await nats.connect(nats_server.url)
        try:
            await until(lambda: _count(first.jetstream(), 1), message="the first event in ORDERS")
        finally:
            await first.close()
        nats_server.stop()
        for n in range(1, 6):
            await record(database, f"o-{n}", placed(f"o-{n}"))
        nats_server.start()
        check = await nats.connect(nats_server.url)
        try:
            js = check.jetstream()
            await until(lambda: _count(js, 6), timeout=20, message="backlog drained")
            subjects = [m.headers["ce-subject"] for m in await stream_messages(js)]
        finally:
            await check.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay_.close()
        await broker.close()
    assert subjects == [f"o-{n}" for n in range(6)]


class Effects:
    """A handler that writes one row per applied event, failing on command."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}

    async def __call__(self, transaction: SqlTransaction, event: ReceivedEvent) -> None:
        left = self.failures.get(event.subject, 0)
        if left:
            self.failures[event.subject] = left - 1
            raise RetryLater(f"{event.subject} not yet")
        await transaction.execute(
            "INSERT INTO effects (event_id, order_id, kind) VALUES (?, ?, ?)",
            (event.id, event.subject, event.type),
        )


def consumer(
    broker: Broker, database: Database, effects: Effects, **kwargs: object
) -> EventConsumer:
    return EventConsumer(
        broker,
        database,
        stream=ORDERS,
        durable="test-consumer",
        event_types=TYPES,
        handlers={events_pb2.OrderPlaced: effects},
        backoff=(0.05,),
        **kwargs,  # type: ignore[arg-type]
    )


async def publish(js: JetStreamContext, event_id: str, data: bytes, **headers: str) -> None:
    await js.publish(
        "orders.events.OrderPlaced",
        data,
        headers={
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": "/foodmesh/orders",
            "ce-type": "foodmesh.orders.v1.OrderPlaced",
            "ce-subject": event_id.split(":")[0],
            "ce-time": "2026-12-03T10:00:00+00:00",
            **headers,
        },
    )


async def effects_of(database: Database) -> list[str]:
    return [r["event_id"] for r in await database.fetch_all("SELECT event_id FROM effects")]


async def test_each_event_has_one_effect_however_often_it_is_delivered(
    js: JetStreamContext, nats_server: NatsServer, database: Database
) -> None:
    broker = Broker(nats_server.url, "test consumer")
    await broker.ensure_stream(ORDERS)
    effects = Effects()
    effects.failures["o-2"] = 2  # applied on its third delivery
    for n in range(4):
        await publish(js, f"o-{n}:1", placed(f"o-{n}").SerializeToString())
    # The same event again under another message id: past JetStream's deduplication.
    await publish(js, "o-1:1", placed("o-1").SerializeToString(), **{"Nats-Msg-Id": "again"})
    await publish(
        js,
        "o-9:2",
        events_pb2.OrderConfirmed(order_id="o-9").SerializeToString(),
        **{"ce-type": "foodmesh.orders.v1.OrderConfirmed"},
    )  # a type with no handler: acked, no effect
    running = consumer(broker, database, effects)
    task = asyncio.create_task(running.run())
    try:
        await until(lambda: _has(database, 4), message="4 effects")
        await until(lambda: _drained(js), message="every message acked")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()
    assert sorted(await effects_of(database)) == ["o-0:1", "o-1:1", "o-2:1", "o-3:1"]
    assert running.applied == 4


async def _has(database: Database, count: int) -> bool:
    return len(await effects_of(database)) >= count


async def _drained(js: JetStreamContext) -> bool:
    info = await js.consumer_info("ORDERS", "test-consumer")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_poison_events_go_to_the_dead_letter_subject_and_the_rest_flows(
    js: JetStreamContext, nats_server: NatsServer, database: Database
) -> None:
    broker = Broker(nats_server.url, "test consumer")
    await broker.ensure_stream(ORDERS)
    effects = Effects()
    effects.failures["o-4"] = 99  # never applies: dead-lettered after max_deliver
    await publish(js, "o-0:1", placed("o-0").SerializeToString())
    await publish(js, "o-1:1", b"\xff\xff not protobuf")
    await publish(js, "o-2:1", b"", **{"ce-type": "foodmesh.orders.v1.NoSuchEvent"})
    await js.publish("orders.events.OrderPlaced", b"no headers at all")
    await publish(js, "o-4:1", placed("o-4").SerializeToString())
    await publish(js, "o-5:1", placed("o-5").SerializeToString())
    task = asyncio.create_task(consumer(broker, database, effects, max_deliver=3).run())
    try:
        await until(lambda: _count(js, 4, "DEADLETTER"), message="4 dead letters")
        await until(lambda: _has(database, 2), message="the good events applied")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()
    assert sorted(await effects_of(database)) == ["o-0:1", "o-5:1"]
    letters = await stream_messages(js, "DEADLETTER")
    reasons = {m.headers.get("ce-id", "<none>"): m.headers["x-dead-letter-reason"] for m in letters}
    assert set(reasons) == {"o-1:1", "o-2:1", "<none>", "o-4:1"}
    assert "DecodeError" in reasons["o-1:1"]
    assert "NoSuchEvent" in reasons["o-2:1"]
    assert "ce-specversion" in reasons["<none>"]
    assert "failed 3 times" in reasons["o-4:1"]
    assert all(m.subject == "deadletter.test-consumer" for m in letters)
