"""`python -m services.payments`: one payments instance, registered in Consul; its instances
share `<data-dir>/payments.db`."""

from __future__ import annotations

import asyncio
import sys

from foodmesh.payments.v1 import payments_pb2, payments_pb2_grpc
from services.payments.servicer import PaymentServicer
from services.payments.store import PaymentsStore
from services.runtime import ServiceRuntime

SERVICE = "payments"


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv) as runtime:
        store = await runtime.closing(PaymentsStore.open(runtime.database_location()))
        server = runtime.server()
        server.add_service(
            payments_pb2.DESCRIPTOR.services_by_name["PaymentService"],
            payments_pb2_grpc.add_PaymentServiceServicer_to_server,
            PaymentServicer(store),
        )
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
