"""`python -m services.orders`: one orders instance. It checks customers with users, prices
orders through catalog, and runs each checkout saga over payments and delivery, all found in
Consul and called on mesh channels. Sagas that another instance left unfinished (it crashed,
or stopped) are taken over once their lease lapses: at start, and every lease period. The
orders' events are published to JetStream (stream ORDERS) by the outbox relay of whichever
instance holds its lease, and delivery's events (stream DELIVERY) move orders out for
delivery and to DELIVERED (services/orders/progress.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from foodmesh.catalog.v1 import catalog_pb2_grpc
from foodmesh.delivery.v1 import delivery_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.payments.v1 import payments_pb2_grpc
from foodmesh.users.v1 import users_pb2_grpc
from meshkit.events import context_stream
from meshkit.saga import Leases, SagaRunner
from meshkit.storage.database import DatabaseUnavailable
from services.cli import positive_seconds
from services.orders import crashpoints
from services.orders.checkout import DEFAULT_SAGA_TIMEOUT_S, Checkout
from services.orders.progress import DELIVERY_EVENTS, DeliveryProgress
from services.orders.servicer import OrderServicer
from services.orders.state import AUTHORIZE, CAPTURE, SCHEDULE, OrderState
from services.orders.store import OrdersStore
from services.runtime import ServiceRuntime

SERVICE = "orders"
STEPS = (AUTHORIZE, SCHEDULE, CAPTURE)
log = logging.getLogger(__name__)


def flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--saga-timeout",
        type=positive_seconds,
        default=DEFAULT_SAGA_TIMEOUT_S,
        help="seconds a checkout may take before it gives up and compensates "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=positive_seconds,
        default=5.0,
        help="seconds an instance holds a saga without renewing; a crashed instance's "
        "sagas are taken over after this (default: %(default)s)",
    )


@asynccontextmanager
async def recovering(runner: SagaRunner[OrderState], store: OrdersStore) -> AsyncIterator[None]:
    """Resume unfinished sagas whose lease is free or lapsed, now and every lease period."""

    async def loop() -> None:
        while True:
            try:
                started = await runner.recover(await store.unfinished())
            except DatabaseUnavailable as exc:
                log.warning("saga recovery: %s; trying again in %.0f s", exc, runner.leases.ttl)
            else:
                if started:
                    log.info("resumed %d unfinished checkout sagas", started)
            await asyncio.sleep(runner.leases.ttl)

    task = asyncio.get_running_loop().create_task(loop(), name="saga recovery")
    try:
        yield
    finally:
        task.cancel()
        await runner.close()


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv, flags) as runtime:
        args = runtime.args
        store = await runtime.closing(OrdersStore.open(runtime.database_location()))
        payments = payments_pb2_grpc.PaymentServiceStub(runtime.channel("payments"))
        delivery = delivery_pb2_grpc.DeliveryServiceStub(runtime.channel("delivery"))
        try:
            crash_at = crashpoints.from_environment(STEPS)
        except ValueError as error:
            raise SystemExit(f"orders: {error}") from None
        runner = SagaRunner(
            Checkout(payments, delivery, timeout_s=args.saga_timeout, crash_at=crash_at),
            store,
            Leases(store.database, runtime.instance_id, ttl=args.lease_seconds),
            tracer=runtime.tracer,
        )
        runtime.publish_outbox(store.database, runner.leases)
        runtime.consume(
            store.database,
            context_stream("delivery"),
            DELIVERY_EVENTS,
            DeliveryProgress(store).handlers(),
        )
        server = runtime.server()
        server.add_service(
            orders_pb2.DESCRIPTOR.services_by_name["OrderService"],
            orders_pb2_grpc.add_OrderServiceServicer_to_server,
            OrderServicer(
                users=users_pb2_grpc.UserServiceStub(runtime.channel("users")),
                catalog=catalog_pb2_grpc.CatalogServiceStub(runtime.channel("catalog")),
                delivery=delivery,
                store=store,
                runner=runner,
            ),
        )
        async with recovering(runner, store):
            return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
