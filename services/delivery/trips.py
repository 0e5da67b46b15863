"""A courier's trip as a plan in time, and the small task that applies what the plan says.

No process owns a trip. ScheduleDelivery stores, with the delivery, the two times its trip
was planned for (pickup at half the trip, arrival at its end); from then on the delivery's
state is a function of the clock: ASSIGNED before pickup_time, PICKED_UP from then, DELIVERED
from eta_time, unless it was CANCELLED first. Whichever instance notices that a time has come
writes the step down, with a conditional UPDATE (store.py) that only the first writer's
changes anything and that records the planned time, not the time it was noticed, so every
instance writes the same thing. A crash therefore loses nothing (the plan is in the file), and
two instances cannot disagree (the plan decides, the write lock orders them).

Reads, tracks, schedules and cancels apply due steps before they look, so they see the state
the clock says. The periodic `advancing` task in every instance applies them too, so a trip
ends (and its courier is free, and its history is written) on time even when nobody asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

DEFAULT_COURIERS = 10
DEFAULT_TRIP_SECONDS = 30.0
MAX_ADVANCE_INTERVAL_S = 1.0

Clock = Callable[[], datetime]
_log = logging.getLogger(__name__)


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class DeliveryStatus(StrEnum):
    """foodmesh.delivery.v1.DeliveryStatus without the DELIVERY_STATUS_ prefix."""

    ASSIGNED = "ASSIGNED"
    PICKED_UP = "PICKED_UP"
    DELIVERED = "DELIVERED"
    CANCELLED = "CANCELLED"


FINAL = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.CANCELLED})
ON_TRIP = frozenset({DeliveryStatus.ASSIGNED, DeliveryStatus.PICKED_UP})
"""The statuses in which a delivery keeps its courier busy."""


@dataclass(frozen=True, slots=True)
class Trip:
    """When a trip's courier picks the food up and when it arrives."""

    pickup_time: datetime
    eta_time: datetime


@dataclass(frozen=True, slots=True)
class Fleet:
    """The courier pool (`courier-1` .. `courier-N`) and how long each trip takes."""

    couriers: int = DEFAULT_COURIERS
    trip_seconds: float = DEFAULT_TRIP_SECONDS

    def __post_init__(self) -> None:
        if self.couriers < 0:
            raise ValueError(f"couriers must be >= 0, got {self.couriers}")
        if not self.trip_seconds > 0:
            raise ValueError(f"trip_seconds must be > 0, got {self.trip_seconds}")

    def courier_ids(self) -> Iterator[str]:
        """Every courier of the pool, in the order free ones are chosen (lazily: a pool of a
        million costs what its busy couriers cost, not a million strings per schedule)."""
        return (f"courier-{number}" for number in range(1, self.couriers + 1))

    def plan(self, start: datetime) -> Trip:
        """The trip of a delivery scheduled at `start`: pickup at half of it."""
        trip = timedelta(seconds=self.trip_seconds)
        return Trip(pickup_time=start + trip / 2, eta_time=start + trip)

    @property
    def advance_interval(self) -> float:
        """Seconds between two runs of the periodic task: often enough for a trip's steps
        to be written within a quarter of a trip, at most a second apart."""
        return min(MAX_ADVANCE_INTERVAL_S, self.trip_seconds / 4)


def next_due(status: DeliveryStatus, trip: Trip) -> datetime | None:
    """When a delivery in `status` moves on by itself next; None once it is final."""
    if status is DeliveryStatus.ASSIGNED:
        return trip.pickup_time
    if status is DeliveryStatus.PICKED_UP:
        return trip.eta_time
    return None


def is_due(status: DeliveryStatus, trip: Trip, now: datetime) -> bool:
    """True when the plan says the delivery has moved on by `now`."""
    due = next_due(status, trip)
    return due is not None and due <= now


@asynccontextmanager
async def advancing(advance: Callable[[], Awaitable[int]], interval: float) -> AsyncIterator[None]:
    """Run `advance` (apply the due steps of every trip; the number applied) now and every
    `interval` seconds while the block runs. A failing run is logged and the next one tries
    again: the steps stay due, and every read applies them anyway.

    When the block ends the task is told to stop and awaited, not cancelled: a run in
    progress finishes its transaction (a cancel landing during COMMIT can surface as another
    error), and the store it uses is closed only after it."""
    stopping = asyncio.Event()

    async def loop() -> None:
        while not stopping.is_set():
            try:
                applied = await advance()
            except Exception:
                if _cancelling():
                    raise  # a cancellation that another error replaced: stop
                _log.exception("applying due trip steps failed; trying again in %ss", interval)
            else:
                if applied:
                    _log.debug("applied %d due trip steps", applied)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)

    task = asyncio.get_running_loop().create_task(loop(), name="trip progress")
    try:
        yield
    finally:
        stopping.set()
        await task


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
