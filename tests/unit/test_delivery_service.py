"""DeliveryService on real in-process grpc.aio servers and a real database (a SQLite file, and
a Postgres database): the courier pool, trips that move on with an injected clock (and one
real short trip), cancels, tracking, bad input that names its field and stores nothing, and
the idempotency ledger, also under concurrent duplicates reaching two instances on one
database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from foodmesh.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from mesh.testing import InProcessServer
from meshkit.storage.database import IntegrityError, open_database
from services.cli import parse_args
from services.delivery.__main__ import flags
from services.delivery.servicer import DeliveryServicer
from services.delivery.store import DeliveriesStore, NewDelivery
from services.delivery.trips import Clock, Fleet, advancing, utc_now
from tests.conftest import Locate
from tests.unit.demo_services import rpc_error

if TYPE_CHECKING:
    from foodmesh.delivery.v1.delivery_pb2_grpc import DeliveryServiceAsyncStub as DeliveryStub

TABLES = ("deliveries", "delivery_events", "idempotent_requests")
NOTHING_STORED = dict.fromkeys(TABLES, 0)
START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
TRIP_S = 30.0  # pickup at START + 15 s, arrival at START + 30 s
POLL_S = 0.02
STREAM_DEADLINE_S = 5.0
S = delivery_pb2.DeliveryStatus
ASSIGNED, PICKED_UP = S.DELIVERY_STATUS_ASSIGNED, S.DELIVERY_STATUS_PICKED_UP
DELIVERED, CANCELLED = S.DELIVERY_STATUS_DELIVERED, S.DELIVERY_STATUS_CANCELLED


class ManualClock:
    """A UTC clock that stands still until a test moves it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def schedule_request(**fields: Any) -> delivery_pb2.ScheduleDeliveryRequest:
    values: dict[str, Any] = {
        "order_id": "order-1",
        "restaurant_id": "roma",
        "address": "1 Test Street",
    }
    values.update(fields)
    return delivery_pb2.ScheduleDeliveryRequest(**values)


def cancel_request(delivery_id: str, key: str = "") -> delivery_pb2.CancelDeliveryRequest:
    return delivery_pb2.CancelDeliveryRequest(delivery_id=delivery_id, idempotency_key=key)


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def time_of(timestamp: Any) -> datetime:
    moment: datetime = timestamp.ToDatetime(tzinfo=UTC)
    return moment


async def count_rows(db: Path | str, table: str) -> int:
    """The number of rows of a table, read through a connection of its own."""
    async with await open_database(db) as database:
        row = await database.fetch_one(f"SELECT COUNT(*) FROM {table}")
    assert row is not None
    return int(row[0])


@asynccontextmanager
async def delivery_server(
    db: Path | str, fleet: Fleet, clock: Clock
) -> AsyncIterator[DeliveryStub]:
    """A delivery service on db with this pool and clock; yields a stub that calls it."""
    async with await DeliveriesStore.open(db, fleet=fleet, clock=clock) as store:
        servicer = DeliveryServicer(store, track_poll_s=POLL_S)
        add = delivery_pb2_grpc.add_DeliveryServiceServicer_to_server
        async with InProcessServer((add, servicer)) as server:
            yield delivery_pb2_grpc.DeliveryServiceStub(server.channel)


@dataclass
class Deliveries:
    """Delivery servers on one database, sharing one clock; `stub` calls the first."""

    stubs: list[DeliveryStub]
    db: Path | str
    clock: ManualClock

    @property
    def stub(self) -> DeliveryStub:
        return self.stubs[0]

    async def stored_rows(self) -> dict[str, int]:
        return {table: await count_rows(self.db, table) for table in TABLES}

    async def get(self, delivery_id: str) -> delivery_pb2.Delivery:
        return await self.stub.GetDelivery(delivery_pb2.GetDeliveryRequest(delivery_id=delivery_id))

    async def events(self, delivery_id: str) -> list[tuple[str | None, str, datetime]]:
        """The delivery's history as (from, to, time), oldest first, read from the database."""
        async with await open_database(self.db) as database:
            rows = await database.fetch_all(
                "SELECT from_status, to_status, time FROM delivery_events"
                " WHERE delivery_id = ? ORDER BY event_id",
                (delivery_id,),
            )
        return [
            (row["from_status"], row["to_status"], datetime.fromisoformat(row["time"]))
            for row in rows
        ]

    async def stored_status(self, delivery_id: str) -> str:
        """The status stored, read without the service (which would apply due steps)."""
        async with await open_database(self.db) as database:
            row = await database.fetch_one(
                "SELECT status FROM deliveries WHERE delivery_id = ?", (delivery_id,)
            )
        assert row is not None
        return str(row["status"])


@asynccontextmanager
async def deliveries_on(
    locate: Locate, *, couriers: int = 2, servers: int = 1
) -> AsyncIterator[Deliveries]:
    db = locate("delivery")
    clock = ManualClock()
    fleet = Fleet(couriers=couriers, trip_seconds=TRIP_S)
    async with AsyncExitStack() as stack:
        stubs = [
            await stack.enter_async_context(delivery_server(db, fleet, clock))
            for _ in range(servers)
        ]
        yield Deliveries(stubs, db, clock)


@pytest.fixture
async def deliveries(locate: Locate) -> AsyncIterator[Deliveries]:
    async with deliveries_on(locate) as opened:
        yield opened


async def track(
    stub: DeliveryStub, delivery_id: str
) -> grpc.aio.UnaryStreamCall[Any, delivery_pb2.Delivery]:
    request = delivery_pb2.TrackDeliveryRequest(delivery_id=delivery_id)
    return stub.TrackDelivery(request, timeout=STREAM_DEADLINE_S)


async def next_message(call: grpc.aio.UnaryStreamCall[Any, delivery_pb2.Delivery]) -> Any:
    """The stream's next message, or grpc.aio.EOF once it ended."""
    return await asyncio.wait_for(call.read(), STREAM_DEADLINE_S)


async def rest_of(call: grpc.aio.UnaryStreamCall[Any, delivery_pb2.Delivery]) -> list[Any]:
    """The stream's messages from here to its end (which it must reach)."""
    messages = []
    while (message := await next_message(call)) is not grpc.aio.EOF:
        messages.append(message)
    assert await call.code() == grpc.StatusCode.OK
    return messages


# -- scheduling and the pool ------------------------------------------------------------


async def test_schedule_assigns_a_courier_and_plans_the_trip(deliveries: Deliveries) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    assert delivery.delivery_id.startswith("d-")
    assert (delivery.order_id, delivery.restaurant_id) == ("order-1", "roma")
    assert delivery.address == "1 Test Street"
    assert (delivery.courier_id, delivery.status) == ("courier-1", ASSIGNED)
    assert time_of(delivery.pickup_time) == at(TRIP_S / 2)
    assert time_of(delivery.eta_time) == at(TRIP_S)
    assert time_of(delivery.create_time) == time_of(delivery.update_time) == START

    assert await deliveries.get(delivery.delivery_id) == delivery
    listed = await deliveries.stub.ListDeliveries(
        delivery_pb2.ListDeliveriesRequest(order_id="order-1")
    )
    assert list(listed.deliveries) == [delivery]
    assert await deliveries.events(delivery.delivery_id) == [(None, "ASSIGNED", START)]


async def test_an_exhausted_pool_refuses_with_no_courier_available(
    deliveries: Deliveries,
) -> None:
    first = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-1"))
    second = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-2"))
    assert (first.courier_id, second.courier_id) == ("courier-1", "courier-2")
    before = await deliveries.stored_rows()
    error = await rpc_error(
        deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-3", idempotency_key="k"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.details() or "").startswith("no courier available")
    assert "every courier is on a trip" in (error.details() or "")
    assert await deliveries.stored_rows() == before


async def test_no_couriers_refuses_every_delivery(locate: Locate) -> None:
    async with deliveries_on(locate, couriers=0) as deliveries:
        for key in ("", "k"):
            error = await rpc_error(
                deliveries.stub.ScheduleDelivery(schedule_request(idempotency_key=key))
            )
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (error.details() or "").startswith("no courier available")
        assert await deliveries.stored_rows() == NOTHING_STORED


async def test_the_trip_moves_through_pickup_to_delivered_at_its_planned_times(
    deliveries: Deliveries,
) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    deliveries.clock.advance(TRIP_S / 2 - 0.001)
    assert (await deliveries.get(delivery.delivery_id)).status == ASSIGNED
    deliveries.clock.advance(0.001)
    picked = await deliveries.get(delivery.delivery_id)
    assert picked.status == PICKED_UP
    assert time_of(picked.update_time) == at(TRIP_S / 2)
    deliveries.clock.advance(TRIP_S)  # read late: the step keeps its planned time
    arrived = await deliveries.get(delivery.delivery_id)
    assert arrived.status == DELIVERED
    assert time_of(arrived.update_time) == time_of(arrived.eta_time) == at(TRIP_S)
    assert await deliveries.events(delivery.delivery_id) == [
        (None, "ASSIGNED", START),
        ("ASSIGNED", "PICKED_UP", at(TRIP_S / 2)),
        ("PICKED_UP", "DELIVERED", at(TRIP_S)),
    ]


async def test_the_courier_is_free_again_after_delivered(locate: Locate) -> None:
    async with deliveries_on(locate, couriers=1) as deliveries:
        first = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-1"))
        busy = await rpc_error(deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-2")))
        assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
        deliveries.clock.advance(TRIP_S)  # nobody reads: the schedule applies the arrival
        second = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-2"))
        assert second.courier_id == first.courier_id == "courier-1"
        assert (await deliveries.get(first.delivery_id)).status == DELIVERED


async def test_the_periodic_task_ends_trips_when_nobody_reads(locate: Locate) -> None:
    db = locate("delivery")
    clock = ManualClock()
    async with await DeliveriesStore.open(db, fleet=Fleet(1, TRIP_S), clock=clock) as store:
        new = NewDelivery(order_id="o-1", restaurant_id="roma", address="1 Test Street")
        delivery_id = (await store.schedule(new, key=None)).response.delivery_id
        deliveries = Deliveries([], db, clock)
        async with advancing(store.advance, interval=0.01):
            clock.advance(TRIP_S)
            deadline = asyncio.get_running_loop().time() + STREAM_DEADLINE_S
            while await deliveries.stored_status(delivery_id) != "DELIVERED":
                assert asyncio.get_running_loop().time() < deadline, "the trip never ended"
                await asyncio.sleep(0.01)
        assert [to for _, to, _ in await deliveries.events(delivery_id)] == [
            "ASSIGNED",
            "PICKED_UP",
            "DELIVERED",
        ]


async def test_the_periodic_task_survives_a_failing_run_and_lets_a_run_finish() -> None:
    runs: list[str] = []
    started = asyncio.Event()

    async def advance() -> int:
        runs.append("started")
        if len(runs) == 1:
            raise RuntimeError("database is locked")
        started.set()
        await asyncio.sleep(0.05)  # the block ends meanwhile: the run is not cut short
        runs.append("finished")
        return 0

    async with advancing(advance, interval=0.01):
        await asyncio.wait_for(started.wait(), STREAM_DEADLINE_S)
    assert runs == ["started", "started", "finished"]


# -- cancelling -------------------------------------------------------------------------


async def test_cancel_before_pickup_frees_the_courier(locate: Locate) -> None:
    async with deliveries_on(locate, couriers=1) as deliveries:
        delivery = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-1"))
        deliveries.clock.advance(5)
        cancelled = await deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id))
        assert cancelled.status == CANCELLED
        assert time_of(cancelled.update_time) == at(5)
        assert cancelled.courier_id == "courier-1"
        assert await deliveries.get(delivery.delivery_id) == cancelled
        again = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="o-2"))
        assert again.courier_id == "courier-1"
        deliveries.clock.advance(TRIP_S)  # a cancelled trip never moves on
        assert await deliveries.get(delivery.delivery_id) == cancelled


@pytest.mark.parametrize(("elapsed", "state"), [(TRIP_S / 2, "PICKED_UP"), (TRIP_S, "DELIVERED")])
async def test_cancel_after_pickup_is_refused_naming_the_state(
    deliveries: Deliveries, elapsed: float, state: str
) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    deliveries.clock.advance(elapsed)
    current = await deliveries.get(delivery.delivery_id)
    before = await deliveries.stored_rows()
    error = await rpc_error(
        deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id, key="undo"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"delivery_id {delivery.delivery_id!r} is {state}: the food is picked up already; "
        "only an ASSIGNED delivery can be cancelled"
    )
    assert await deliveries.get(delivery.delivery_id) == current
    assert await deliveries.stored_rows() == before


async def test_cancel_applies_a_due_pickup_before_it_decides(deliveries: Deliveries) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    deliveries.clock.advance(TRIP_S / 2)  # nobody has read since: the database says ASSIGNED
    assert await deliveries.stored_status(delivery.delivery_id) == "ASSIGNED"
    error = await rpc_error(deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is PICKED_UP" in (error.details() or "")


async def test_cancelling_a_cancelled_delivery_returns_it_unchanged(
    deliveries: Deliveries,
) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    cancelled = await deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id))
    deliveries.clock.advance(TRIP_S)
    again = await deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id))
    with_key = await deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id, "k"))
    assert again == with_key == cancelled
    assert [to for _, to, _ in await deliveries.events(delivery.delivery_id)] == [
        "ASSIGNED",
        "CANCELLED",
    ]


async def test_unknown_delivery_id_is_not_found_and_stores_nothing(
    deliveries: Deliveries,
) -> None:
    errors = [
        await rpc_error(
            deliveries.stub.GetDelivery(delivery_pb2.GetDeliveryRequest(delivery_id="d-nope"))
        ),
        await rpc_error(deliveries.stub.CancelDelivery(cancel_request("d-nope", key="k"))),
        await rpc_error(next_message(await track(deliveries.stub, "d-nope"))),
    ]
    for error in errors:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "delivery_id 'd-nope': no such delivery"
    assert await deliveries.stored_rows() == NOTHING_STORED


async def test_list_deliveries_returns_one_order_in_schedule_order(deliveries: Deliveries) -> None:
    first = await deliveries.stub.ScheduleDelivery(schedule_request())
    await deliveries.stub.ScheduleDelivery(schedule_request(order_id="order-2"))
    cancelled = await deliveries.stub.CancelDelivery(cancel_request(first.delivery_id))
    second = await deliveries.stub.ScheduleDelivery(schedule_request())
    deliveries.clock.advance(TRIP_S / 2)
    listed = await deliveries.stub.ListDeliveries(
        delivery_pb2.ListDeliveriesRequest(order_id="order-1")
    )
    assert [d.delivery_id for d in listed.deliveries] == [first.delivery_id, second.delivery_id]
    assert [d.status for d in listed.deliveries] == [CANCELLED, PICKED_UP]
    assert listed.deliveries[0] == cancelled
    empty = await deliveries.stub.ListDeliveries(
        delivery_pb2.ListDeliveriesRequest(order_id="none")
    )
    assert list(empty.deliveries) == []


# -- bad input ----------------------------------------------------------------------------

LONG_KEY = "k" * 256
INVALID_SCHEDULES = {
    "order_id must not be empty": schedule_request(order_id=""),
    "restaurant_id must not be empty": schedule_request(restaurant_id=""),
    "address must not be empty": schedule_request(address=""),
    "address must not be empty ": schedule_request(address="   "),
    "address has 501 characters; the most is 500": schedule_request(address="a" * 501),
    "order_id has 501 characters; the most is 500": schedule_request(order_id="o" * 501),
    "idempotency_key has 256 characters": schedule_request(idempotency_key=LONG_KEY),
}


@pytest.mark.parametrize("message", INVALID_SCHEDULES)
async def test_invalid_schedule_names_its_field_and_stores_nothing(
    deliveries: Deliveries, message: str
) -> None:
    error = await rpc_error(deliveries.stub.ScheduleDelivery(INVALID_SCHEDULES[message]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message.strip() in (error.details() or "")
    assert await deliveries.stored_rows() == NOTHING_STORED


async def test_invalid_cancel_and_reads_name_their_field(deliveries: Deliveries) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    before = await deliveries.stored_rows()
    stub = deliveries.stub
    refusals = {
        "delivery_id must not be empty": [
            stub.CancelDelivery(cancel_request("", key="k")),
            stub.GetDelivery(delivery_pb2.GetDeliveryRequest()),
        ],
        "idempotency_key has 256 characters": [
            stub.CancelDelivery(cancel_request(delivery.delivery_id, key=LONG_KEY))
        ],
        "order_id must not be empty": [
            stub.ListDeliveries(delivery_pb2.ListDeliveriesRequest()),
        ],
    }
    for message, calls in refusals.items():
        for call in calls:
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (error.details() or "")
    refused = await rpc_error(next_message(await track(stub, "")))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "delivery_id must not be empty" in (refused.details() or "")
    assert await deliveries.stored_rows() == before
    assert (await deliveries.get(delivery.delivery_id)).status == ASSIGNED


# -- tracking -----------------------------------------------------------------------------


async def test_track_sends_the_current_state_then_each_step_and_ends(
    deliveries: Deliveries,
) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    call = await track(deliveries.stub, delivery.delivery_id)
    assert await next_message(call) == delivery
    deliveries.clock.advance(TRIP_S / 2)
    picked = await next_message(call)
    assert picked.status == PICKED_UP and time_of(picked.update_time) == at(TRIP_S / 2)
    deliveries.clock.advance(TRIP_S / 2)
    arrived = await next_message(call)
    assert arrived.status == DELIVERED and time_of(arrived.update_time) == at(TRIP_S)
    assert await next_message(call) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_track_sends_each_step_once_when_two_fall_between_two_looks(
    deliveries: Deliveries,
) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    deliveries.clock.advance(1)
    call = await track(deliveries.stub, delivery.delivery_id)
    assert (await next_message(call)).status == ASSIGNED
    deliveries.clock.advance(TRIP_S)
    sent = await rest_of(call)
    assert [(m.status, time_of(m.update_time)) for m in sent] == [
        (PICKED_UP, at(TRIP_S / 2)),
        (DELIVERED, at(TRIP_S)),
    ]


async def test_track_of_a_cancelled_delivery_ends_at_once(deliveries: Deliveries) -> None:
    delivery = await deliveries.stub.ScheduleDelivery(schedule_request())
    cancelled = await deliveries.stub.CancelDelivery(cancel_request(delivery.delivery_id))
    call = await track(deliveries.stub, delivery.delivery_id)
    assert await rest_of(call) == [cancelled]


async def test_track_sees_a_cancel_made_through_another_instance(locate: Locate) -> None:
    async with deliveries_on(locate, servers=2) as deliveries:
        first, second = deliveries.stubs
        delivery = await first.ScheduleDelivery(schedule_request())
        call = await track(first, delivery.delivery_id)
        assert (await next_message(call)).status == ASSIGNED
        cancelled = await second.CancelDelivery(cancel_request(delivery.delivery_id))
        assert await next_message(call) == cancelled
        assert await next_message(call) is grpc.aio.EOF


async def test_a_real_short_trip_is_tracked_to_its_end(locate: Locate) -> None:
    db = locate("delivery")
    async with delivery_server(db, Fleet(couriers=1, trip_seconds=0.4), utc_now) as stub:
        delivery = await stub.ScheduleDelivery(schedule_request())
        call = await track(stub, delivery.delivery_id)
        sent = await rest_of(call)
        assert [m.status for m in sent] == [ASSIGNED, PICKED_UP, DELIVERED]
        assert time_of(sent[-1].update_time) == time_of(delivery.eta_time)
        again = await stub.ScheduleDelivery(schedule_request(order_id="order-2"))
        assert again.courier_id == delivery.courier_id


# -- idempotency --------------------------------------------------------------------------


async def test_schedule_with_a_used_key_returns_the_first_delivery(
    deliveries: Deliveries,
) -> None:
    request = schedule_request(idempotency_key="checkout-1/schedule")
    first = await deliveries.stub.ScheduleDelivery(request)
    deliveries.clock.advance(TRIP_S / 2)
    again = await deliveries.stub.ScheduleDelivery(request)
    assert again == first  # as the first call left it, though it is picked up since
    assert (await deliveries.get(first.delivery_id)).status == PICKED_UP
    assert await count_rows(deliveries.db, "deliveries") == 1
    assert await count_rows(deliveries.db, "idempotent_requests") == 1


async def test_schedule_without_a_key_does_not_deduplicate(deliveries: Deliveries) -> None:
    first = await deliveries.stub.ScheduleDelivery(schedule_request())
    second = await deliveries.stub.ScheduleDelivery(schedule_request())
    assert first.delivery_id != second.delivery_id
    assert {first.courier_id, second.courier_id} == {"courier-1", "courier-2"}
    assert await count_rows(deliveries.db, "idempotent_requests") == 0


@pytest.mark.parametrize(
    "other",
    [
        schedule_request(order_id="order-2", idempotency_key="k"),
        schedule_request(restaurant_id="sakura", idempotency_key="k"),
        schedule_request(address="2 Other Street", idempotency_key="k"),
    ],
)
async def test_schedule_reusing_a_key_with_another_request_is_already_exists(
    deliveries: Deliveries, other: delivery_pb2.ScheduleDeliveryRequest
) -> None:
    await deliveries.stub.ScheduleDelivery(schedule_request(idempotency_key="k"))
    before = await deliveries.stored_rows()
    error = await rpc_error(deliveries.stub.ScheduleDelivery(other))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'k'" in (error.details() or "")
    assert await deliveries.stored_rows() == before


async def test_cancel_with_a_used_key_returns_the_first_result(deliveries: Deliveries) -> None:
    one = await deliveries.stub.ScheduleDelivery(schedule_request())
    two = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="order-2"))
    cancelled = await deliveries.stub.CancelDelivery(cancel_request(one.delivery_id, "undo"))
    deliveries.clock.advance(1)
    assert await deliveries.stub.CancelDelivery(cancel_request(one.delivery_id, "undo")) == (
        cancelled
    )
    error = await rpc_error(deliveries.stub.CancelDelivery(cancel_request(two.delivery_id, "undo")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await deliveries.get(two.delivery_id)).status == ASSIGNED


async def test_concurrent_duplicates_on_two_instances_make_one_delivery(locate: Locate) -> None:
    async with deliveries_on(locate, servers=2) as deliveries:
        request = schedule_request(idempotency_key="checkout-7/schedule")
        answers = await asyncio.gather(
            *(deliveries.stubs[i % 2].ScheduleDelivery(request) for i in range(10))
        )
        assert len({a.SerializeToString() for a in answers}) == 1
        assert await deliveries.stored_rows() == dict.fromkeys(TABLES, 1)
        # One courier used: the other of the two is still free.
        other = await deliveries.stub.ScheduleDelivery(schedule_request(order_id="order-2"))
        assert other.courier_id != answers[0].courier_id


async def test_two_instances_with_one_courier_assign_it_once(locate: Locate) -> None:
    async with deliveries_on(locate, couriers=1, servers=2) as deliveries:
        results = await asyncio.gather(
            *(
                stub.ScheduleDelivery(schedule_request(order_id=f"order-{i}"))
                for i, stub in enumerate(deliveries.stubs)
            ),
            return_exceptions=True,
        )
        assigned = [r for r in results if isinstance(r, delivery_pb2.Delivery)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(assigned) == len(refused) == 1, results
        assert assigned[0].courier_id == "courier-1"
        assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused[0].details() == (
            "no courier available: the only courier is on a trip; try again later"
        )
        assert await count_rows(deliveries.db, "deliveries") == 1


async def test_the_database_itself_refuses_a_second_trip_for_one_courier(locate: Locate) -> None:
    """The partial unique index: whatever a future bug tries, a courier ASSIGNED or PICKED_UP
    on one delivery cannot be stored on another one that is on its way too."""
    async with deliveries_on(locate, couriers=1) as deliveries:
        first = await deliveries.stub.ScheduleDelivery(schedule_request())
        insert = (
            "INSERT INTO deliveries (delivery_id, order_id, restaurant_id, address, courier_id,"
            " status, pickup_time, eta_time, create_time, update_time)"
            " VALUES (?, 'order-2', 'roma', '1 Test Street', ?, ?, 't', 't', 't', 't')"
        )
        async with await open_database(deliveries.db) as database:
            with pytest.raises(IntegrityError):
                async with database.transaction() as transaction:
                    await transaction.execute(insert, ("d-bug", first.courier_id, "ASSIGNED"))
            async with database.transaction() as transaction:  # a finished trip may name it
                await transaction.execute(insert, ("d-done", first.courier_id, "DELIVERED"))
            with pytest.raises(IntegrityError):
                async with database.transaction() as transaction:
                    await transaction.execute(
                        "UPDATE deliveries SET status = 'PICKED_UP' WHERE delivery_id = 'd-done'"
                    )
        assert await deliveries.stored_status("d-done") == "DELIVERED"
        assert await count_rows(deliveries.db, "deliveries") == 2


async def test_many_instances_racing_for_few_couriers_book_each_courier_once(
    locate: Locate,
) -> None:
    async with deliveries_on(locate, couriers=3, servers=4) as deliveries:
        results = await asyncio.gather(
            *(
                deliveries.stubs[i % 4].ScheduleDelivery(schedule_request(order_id=f"order-{i}"))
                for i in range(12)
            ),
            return_exceptions=True,
        )
        assigned = [r for r in results if isinstance(r, delivery_pb2.Delivery)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(assigned) + len(refused) == len(results), results
        assert sorted(d.courier_id for d in assigned) == ["courier-1", "courier-2", "courier-3"]
        assert {r.code() for r in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
        assert await count_rows(deliveries.db, "deliveries") == 3


# -- flags --------------------------------------------------------------------------------


def test_flags_set_the_pool_and_the_trip_time() -> None:
    args = parse_args("delivery", ["--couriers", "0", "--trip-seconds", "0.4"], flags)
    assert (args.couriers, args.trip_seconds) == (0, 0.4)
    defaults = parse_args("delivery", [], flags)
    assert (defaults.couriers, defaults.trip_seconds) == (10, 30.0)


@pytest.mark.parametrize(
    "argv", [["--couriers", "-1"], ["--couriers", "two"], ["--trip-seconds", "0"]]
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args("delivery", argv, flags)
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err
