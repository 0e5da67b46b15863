"""`python -m services.order_history.rebuild --data-dir DIR`: make the order history again,
from the start of the streams it is built from (ORDERS, DELIVERY, CATALOG, on --nats-url or
$NATS_URL), into a fresh `DIR/order-history.db`, and exit when it has applied every event the
streams held when it began. An instance started on DIR answers what the live read model
answers (once that one has caught up to the same events).

Each stream is read by a consumer made for the rebuild (and deleted after it; an abandoned
one is removed by the server after a minute), and each event is recorded in the inbox under
the live consumer's name, so that an instance moved onto the rebuilt database goes on from
where the rebuild stopped, applying nothing twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path

from meshkit.events import Broker, EventConsumer
from services.datadir import database_path
from services.order_history.store import OrderHistoryStore
from services.order_history.streams import SERVICE, consumed


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.order_history.rebuild", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="where the fresh order-history.db goes; it must not hold one yet",
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_URL", ""),
        help="the NATS server holding the streams (default: $NATS_URL)",
    )
    args = parser.parse_args(argv)
    if not args.nats_url:
        parser.error("--nats-url (or NATS_URL) is required: the streams are the source")
    return args


async def rebuild(data_dir: Path, nats_url: str) -> dict[str, int]:
    """Rebuild into data_dir; the events applied, by stream."""
    path = database_path(data_dir, SERVICE)
    if path.exists():
        raise FileExistsError(f"{path} exists: a rebuild goes into a fresh database")
    broker = Broker(nats_url, f"{SERVICE} rebuild")
    broker.start()
    applied: dict[str, int] = {}
    try:
        async with await OrderHistoryStore.open(path) as store:
            for stream, event_types, handlers in consumed(store):
                consumer = EventConsumer(
                    broker,
                    store.database,
                    stream=stream,
                    durable=f"{SERVICE}-rebuild-{uuid.uuid4().hex[:12]}",
                    inbox=SERVICE,
                    event_types=event_types,
                    handlers=handlers,
                    inactive_threshold=60.0,
                )
                applied[stream.name] = await consumer.catch_up()
            orders = await store.count()
    finally:
        await broker.close()
    print(
        f"rebuilt {path}: {sum(applied.values())} events applied"
        f" ({', '.join(f'{name} {count}' for name, count in applied.items())}),"
        f" {orders} orders"
    )
    return applied


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        asyncio.run(rebuild(args.data_dir, args.nats_url))
    except FileExistsError as error:
        print(f"rebuild: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
