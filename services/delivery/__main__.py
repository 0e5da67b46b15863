"""`python -m services.delivery`: one delivery instance, registered in Consul, with a pool of
`--couriers` couriers whose trips take `--trip-seconds` (pickup at half the trip). Its
instances share `<data-dir>/delivery.db`; each applies the trips' due steps every
`Fleet.advance_interval` seconds (services/delivery/trips.py), so no instance owns a trip.
Every change's event is published to JetStream (stream DELIVERY) by the outbox relay of
whichever instance holds its lease."""

from __future__ import annotations

import argparse
import asyncio
import sys

from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from services.cli import non_negative_int, positive_seconds
from services.delivery.servicer import DeliveryServicer
from services.delivery.store import DeliveriesStore
from services.delivery.trips import DEFAULT_COURIERS, DEFAULT_TRIP_SECONDS, Fleet, advancing
from services.runtime import ServiceRuntime

SERVICE = "delivery"


def flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--couriers",
        type=non_negative_int,
        default=DEFAULT_COURIERS,
        help="couriers in the pool (courier-1 .. courier-N), each carrying one delivery at a "
        "time; 0 makes every ScheduleDelivery fail with 'no courier available' "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--trip-seconds",
        type=positive_seconds,
        default=DEFAULT_TRIP_SECONDS,
        help="seconds from assignment to arrival; the food is picked up at half "
        "(default: %(default)s)",
    )


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv, flags) as runtime:
        args = runtime.args
        fleet = Fleet(couriers=args.couriers, trip_seconds=args.trip_seconds)
        store = await runtime.closing(
            DeliveriesStore.open(runtime.database_location(), fleet=fleet)
        )
        runtime.publish_outbox(store.database)
        server = runtime.server()
        server.add_service(
            delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"],
            delivery_pb2_grpc.add_DeliveryServiceServicer_to_server,
            DeliveryServicer(store),
        )
        async with advancing(store.advance, fleet.advance_interval):
            return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
