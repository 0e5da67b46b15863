"""`python -m services.notifications`: one notifications instance. It consumes the orders'
events from JetStream (durable consumer `notifications` on stream ORDERS, shared by every
instance) and turns them into notifications, each event once, in
`<data-dir>/notifications.db`; the push to the customer costs `--push-delay` seconds, paid
by the consumer and not by the checkout that caused it."""

from __future__ import annotations

import argparse
import asyncio
import sys

from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from meshkit.events import ReceivedEvent, context_stream
from services.cli import non_negative_seconds
from services.notifications.servicer import NotificationServicer
from services.notifications.store import NOTIFYING, NotificationsStore
from services.orders.state import EVENT_TYPES as ORDER_EVENTS
from services.runtime import ServiceRuntime

SERVICE = "notifications"
ORDERS = context_stream("orders")


def flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push-delay",
        type=non_negative_seconds,
        default=0.0,
        metavar="SECONDS",
        help="simulated cost of pushing one notification to the customer's device "
        "(default: %(default)s)",
    )


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv, flags) as runtime:
        store = await runtime.closing(NotificationsStore.open(runtime.database_location()))
        servicer = NotificationServicer(store)
        push_delay = runtime.args.push_delay

        async def pushed(event: ReceivedEvent) -> None:
            if isinstance(event.message, NOTIFYING):
                servicer.changed()
                if push_delay:
                    await asyncio.sleep(push_delay)  # the device's round trip

        runtime.consume(store.database, ORDERS, ORDER_EVENTS, store.handlers(), on_applied=pushed)
        server = runtime.server()
        server.add_service(
            notifications_pb2.DESCRIPTOR.services_by_name["NotificationService"],
            notifications_pb2_grpc.add_NotificationServiceServicer_to_server,
            servicer,
        )
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
