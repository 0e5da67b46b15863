"""What carrying events costs: the outbox relay's throughput against the limit of one Python
process, and the latency from an event's commit to a consumer's effect at a steady rate.

    python -m scripts.bench_events                   # 3 rounds of 3000 events; 200/s for 10 s
    python -m scripts.bench_events --events 1000 --rounds 2 --rate 200 --duration 5 --json

How: a real nats-server with JetStream on a free port and a temporary store, and SQLite files
in a temporary directory, as the services have them.

throughput  `--events` events (an order's stream of 8 each, payloads like the orders' events)
            are committed to an outbox first; then, in alternating rounds, two sides send
            them all to JetStream in order, each publish awaiting its PubAck:
              loop   the minimal nats-py loop: `await js.publish(subject, data, headers)` with
                     the CloudEvents headers and `Nats-Msg-Id`, from a list in memory
              relay  meshkit.events.OutboxRelay reading the outbox (batches, the lease, the
                     cursor, the headers, the metrics) from the database
            relay / loop in events per second is what the relay keeps of what one process can
            send; the goal is at least 0.8.
latency     a producer process commits one event every 1/`--rate` s for `--duration` (each in
            its own write transaction, with a row of state beside it, as a service does), and
            its relay publishes them; a consumer process (meshkit.events.EventConsumer, a
            durable pull consumer, an inbox and a row of effect per event in its own database)
            applies them. The latency of an event is from its `recorded_at` (taken in the
            producing transaction, just before its commit) to the commit of its effect, on
            this machine's one clock; p50 and p99 over every event after the first second. The
            goal is p99 under 50 ms at 200 events/s.

Both sides share the machine's cores with nats-server; only ratios within one run, and the
latency at the given rate on this machine, mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import nats
from google.protobuf.message import Message

from foodmesh.orders.v1 import events_pb2, orders_pb2
from meshkit.events import Broker, EventConsumer, EventStore, OutboxRelay, ReceivedEvent, relay
from meshkit.events import inbox as inbox_module
from meshkit.events import store as event_store
from meshkit.events.broker import StreamSpec, context_stream
from meshkit.events.cloudevents import CloudEvent, subject_for
from meshkit.storage import lease
from meshkit.storage.database import Database, SqlTransaction, open_database
from meshkit.storage.lease import Leases
from meshkit.storage.schema import Schema
from scripts.bench_harness import percentile
from scripts.nats_server import NatsServer

EVENTS_PER_ORDER = 8
OUTBOX_SCHEMA = (
    event_store.SCHEMA,
    lease.SCHEMA,
    relay.SCHEMA,
    Schema.of(
        "bench",
        "CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY, stream_id TEXT NOT NULL)",
    ),
)
EFFECT_SCHEMA = (
    inbox_module.SCHEMA,
    Schema.of(
        "bench",
        "CREATE TABLE IF NOT EXISTS effects (event_id TEXT PRIMARY KEY, latency REAL NOT NULL)",
    ),
)
EVENT_TYPES: tuple[type[Message], ...] = (events_pb2.OrderPlaced, events_pb2.OrderConfirmed)
STORE = EventStore(EVENT_TYPES)


def _placed(order_id: str) -> events_pb2.OrderPlaced:
    """An OrderPlaced the size of a real one (three lines, an address)."""
    return events_pb2.OrderPlaced(
        order_id=order_id,
        customer_id="u-3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b",
        restaurant_id="trattoria-roma",
        lines=[
            orders_pb2.OrderLine(item_id=item, quantity=2, unit_price_cents=850)
            for item in ("roma-margherita", "roma-carbonara", "roma-tiramisu")
        ],
        total_cents=5400,
        currency="EUR",
        payment_method="pm_card_visa",
        delivery_address="1 Demo Street, Springfield",
    )


async def _fill_outbox(database: Database, events: int, tag: str) -> None:
    for first in range(0, events, 400):
        async with database.transaction() as transaction:
            for n in range(first, min(first + 400, events), EVENTS_PER_ORDER):
                order_id = f"{tag}-{n // EVENTS_PER_ORDER}"
                await STORE.append_next(
                    transaction, order_id, [_placed(order_id)] * EVENTS_PER_ORDER
                )


async def _loop_side(url: str, items: Sequence[tuple[str, CloudEvent]]) -> float:
    """The minimal loop: each publish awaits its PubAck. Seconds for all of items."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        started = time.perf_counter()
        for subject, event in items:
            await js.publish(subject, event.data, headers=event.headers())
        return time.perf_counter() - started
    finally:
        await client.close()


async def _relay_side(url: str, database: Database, context: str, events: int) -> float:
    """OutboxRelay from the outbox until all `events` are published. Seconds."""
    broker = Broker(url, "bench relay")
    broker.start()
    await broker.ensure_stream(context_stream(context))
    done = asyncio.Event()

    def published(_: object) -> None:
        if outbox.published + 1 >= events:  # called before the count moves
            done.set()

    outbox = OutboxRelay(
        database, Leases(database, "bench"), broker, context=context, after_publish=published
    )
    started = time.perf_counter()
    task = asyncio.get_running_loop().create_task(outbox.run())
    try:
        await done.wait()
        return time.perf_counter() - started
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()
        await broker.close()


async def throughput(url: str, directory: Path, events: int, rounds: int) -> dict[str, object]:
    """Alternating rounds of the loop and the relay over the same events; events/s each."""
    loop_rates: list[float] = []
    relay_rates: list[float] = []
    for n in range(rounds):
        database = await open_database(directory / f"outbox-{n}.db", schema=OUTBOX_SCHEMA)
        try:
            await _fill_outbox(database, events, f"r{n}")
            loop_context, relay_context = f"benchloop{n}", f"benchrelay{n}"
            rows = await database.fetch_all(
                "SELECT stream_id, version, event_type, data, recorded_at FROM events"
                " ORDER BY position"
            )
            items = [
                (
                    subject_for(loop_context, row["event_type"]),
                    CloudEvent(
                        id=relay.event_id(row["stream_id"], row["version"]),
                        source=f"/foodmesh/{loop_context}",
                        type=row["event_type"],
                        subject=row["stream_id"],
                        time=datetime.fromisoformat(row["recorded_at"]),
                        data=row["data"],
                    ),
                )
                for row in rows
            ]
            broker = Broker(url, "bench setup")
            await broker.ensure_stream(context_stream(loop_context))
            await broker.close()
            loop_rates.append(events / await _loop_side(url, items))
            relay_rates.append(events / await _relay_side(url, database, relay_context, events))
        finally:
            await database.close()
        print(
            f"  round {n + 1}: loop {loop_rates[-1]:7.0f} events/s, relay"
            f" {relay_rates[-1]:7.0f} events/s",
            file=sys.stderr,
        )
    loop_rate, relay_rate = statistics.median(loop_rates), statistics.median(relay_rates)
    return {
        "events": events,
        "rounds": rounds,
        "loop_events_per_s": round(loop_rate, 1),
        "relay_events_per_s": round(relay_rate, 1),
        "ratio": round(relay_rate / loop_rate, 3),
    }


def _producer(url: str, path: str, rate: float, duration: float) -> None:
    logging.getLogger("meshkit").setLevel(logging.ERROR)
    asyncio.run(_produce(url, Path(path), rate, duration))


async def _produce(url: str, path: Path, rate: float, duration: float) -> None:
    """Commit one event every 1/rate s (state row + event, one transaction) while the relay
    publishes; stop after duration, once the relay has published everything."""
    database = await open_database(path, schema=OUTBOX_SCHEMA)
    broker = Broker(url, "bench producer")
    broker.start()
    caught_up = asyncio.Event()
    outbox = OutboxRelay(
        database,
        Leases(database, "producer"),
        broker,
        context="benchlat",
        after_publish=lambda _: caught_up.set(),
    )
    task = asyncio.get_running_loop().create_task(outbox.run())
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    try:
        while loop.time() - started < duration:
            order_id = f"lat-{sent}"
            async with database.transaction() as transaction:
                await transaction.execute("INSERT INTO state (stream_id) VALUES (?)", (order_id,))
                await STORE.append_next(transaction, order_id, [_placed(order_id)])
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
        while outbox.published < sent:
            caught_up.clear()
            await caught_up.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()
        await broker.close()
        await database.close()


def _consumer(url: str, path: str, expected: int, out: str) -> None:
    logging.getLogger("meshkit").setLevel(logging.ERROR)
    asyncio.run(_consume(url, Path(path), expected, Path(out)))


async def _consume(url: str, path: Path, expected: int, out: Path) -> None:
    """Apply the latency stream's events until `expected` are in; write each one's latency
    (recorded_at -> the effect's commit) to out, one per line, in arrival order."""
    database = await open_database(path, schema=EFFECT_SCHEMA)
    broker = Broker(url, "bench consumer")
    broker.start()
    latencies: list[float] = []
    done = asyncio.Event()

    async def effect(transaction: SqlTransaction, event: ReceivedEvent) -> None:
        await transaction.execute(
            "INSERT INTO effects (event_id, latency) VALUES (?, 0)", (event.id,)
        )

    async def committed(event: ReceivedEvent) -> None:
        latencies.append((datetime.now(UTC) - event.time).total_seconds())
        if len(latencies) >= expected:
            done.set()

    consumer = EventConsumer(
        broker,
        database,
        stream=StreamSpec("BENCHLAT", ("benchlat.events.>",)),
        durable="bench",
        event_types=EVENT_TYPES,
        handlers={events_pb2.OrderPlaced: effect},
        on_applied=committed,
    )
    task = asyncio.get_running_loop().create_task(consumer.run())
    try:
        await done.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await broker.close()
        await database.close()
    await asyncio.to_thread(out.write_text, "\n".join(f"{x:.6f}" for x in latencies))


def latency(url: str, directory: Path, rate: float, duration: float) -> dict[str, object]:
    """Producer and consumer in two processes; commit-to-effect p50/p99 in ms."""
    expected = int(rate * duration)
    out = directory / "latencies.txt"
    spawn = multiprocessing.get_context("spawn")
    consumer = spawn.Process(
        target=_consumer, args=(url, str(directory / "consumer.db"), expected, str(out))
    )
    consumer.start()
    time.sleep(2.0)  # the consumer's durable exists before the first event (it reads from 0)
    producer = spawn.Process(
        target=_producer, args=(url, str(directory / "producer.db"), rate, duration)
    )
    producer.start()
    producer.join(duration + 60)
    consumer.join(60)
    for process in (producer, consumer):
        if process.is_alive():
            process.kill()
            raise RuntimeError("the latency run did not finish")
    values = [float(x) for x in out.read_text().split()]
    steady = sorted(values[int(rate) :])  # after the first second
    return {
        "rate_per_s": rate,
        "duration_s": duration,
        "events": len(values),
        "p50_ms": round(percentile(steady, 0.50) * 1000, 2),
        "p99_ms": round(percentile(steady, 0.99) * 1000, 2),
        "max_ms": round(steady[-1] * 1000, 2) if steady else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_events", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--events", type=int, default=3000, help="events per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per side")
    parser.add_argument("--rate", type=float, default=200.0, help="latency: events per second")
    parser.add_argument("--duration", type=float, default=10.0, help="latency: seconds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    logging.getLogger("meshkit").setLevel(logging.ERROR)  # not each broker's goodbye
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        directory = Path(tmp)
        with NatsServer(store_dir=directory / "nats", log_path=directory / "nats.log") as server:
            print("throughput (in order, each publish awaiting its PubAck):", file=sys.stderr)
            figures = {
                "throughput": asyncio.run(
                    throughput(server.url, directory, args.events, args.rounds)
                ),
                "latency": latency(server.url, directory, args.rate, args.duration),
            }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    t, lat = figures["throughput"], figures["latency"]
    assert isinstance(t, dict) and isinstance(lat, dict)
    print(
        f"relay throughput: {t['relay_events_per_s']} events/s, minimal nats-py loop"
        f" {t['loop_events_per_s']} events/s: ratio {t['ratio']} (goal >= 0.8)"
    )
    print(
        f"commit -> effect at {lat['rate_per_s']:g} events/s for {lat['duration_s']:g} s"
        f" ({lat['events']} events): p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms,"
        f" max {lat['max_ms']} ms (goal: p99 < 50 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
