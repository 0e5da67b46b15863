"""`python -m services.order_history.rebuild --data-dir DIR` (or `--database-url URL`): make
the order history again, from the start of the streams it is built from (ORDERS, DELIVERY,
CATALOG, on --nats-url or $NATS_URL), into a fresh `DIR/order-history.db` (or an empty
Postgres database), and exit when it has applied every event the streams held when it began.
An instance started on that database answers what the live read model answers (once that one
has caught up to the same events).

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
from services.cli import add_storage_flags, database_location
from services.order_history.store import OrderHistoryStore
from services.order_history.streams import SERVICE, consumed


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.order_history.rebuild", description=__doc__.split("\n\n")[0]
    )
    add_storage_flags(
        parser, "the rebuilt order history's (fresh: it must hold none yet)", default_dir=False
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_URL", ""),
        help="the NATS server holding the streams (default: $NATS_URL)",
    )
    args = parser.parse_args(argv)
    if not args.database_url and args.data_dir is None:
        parser.error("--data-dir or --database-url is required: where the rebuild goes")
    if not args.nats_url:
        parser.error("--nats-url (or NATS_URL) is required: the streams are the source")
    return args


async def rebuild(location: Path | str, nats_url: str) -> dict[str, int]:
    """Rebuild into the database at `location` (a SQLite file's path, or a Postgres URL),
    which must hold no order history yet; the events applied, by stream."""
    if isinstance(location, Path) and location.exists():  # noqa: ASYNC240 - once, at start
        raise FileExistsError(f"{location} exists: a rebuild goes into a fresh database")
    broker = Broker(nats_url, f"{SERVICE} rebuild")
    broker.start()
    applied: dict[str, int] = {}
    try:
        async with await OrderHistoryStore.open(location) as store:
            inbox = await store.database.fetch_one("SELECT COUNT(*) FROM inbox")
            if inbox is not None and inbox[0]:
                raise FileExistsError(
                    f"database {store.database.name!r} holds an order history already:"
                    " a rebuild goes into a fresh database"
                )
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
    where = location if isinstance(location, Path) else f"database {store.database.name!r}"
    print(
        f"rebuilt {where}: {sum(applied.values())} events applied"
        f" ({', '.join(f'{name} {count}' for name, count in applied.items())}),"
        f" {orders} orders"
    )
    return applied


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        asyncio.run(rebuild(database_location(args, SERVICE), args.nats_url))
    except FileExistsError as error:
        print(f"rebuild: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
