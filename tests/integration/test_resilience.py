"""Resilience with real parts: a real Consul, real catalog and orders processes (with the
users, payments and delivery services a checkout needs), calls through mesh channels.
Instances are killed, stopped, slowed down or made to fail (the services' --fault-* flags),
and the callers must cope as the policies promise."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
import pytest
from grpc import aio

import mesh
from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.client.subchannels import SubChannel
from mesh.core.outcome import Classified
from mesh.policy import BreakerPolicy, EjectionPolicy, ServicePolicy
from mesh.server import MeshServer, ServerConfig
from scripts.processes import wait_until_async
from tests.integration.conftest import (
    FAILING,
    MANY_COURIERS,
    ServiceProcess,
    Stack,
    count_orders,
    order,
)

GET_ITEM = catalog_pb2.GetItemRequest(item_id="roma-carbonara")


def subchannel_of(channel: mesh.MeshChannel, process: ServiceProcess) -> SubChannel:
    (sub,) = [s for s in channel.upstream.pool.subchannels() if s.endpoint.port == process.port]
    return sub


async def test_sigkill_of_one_catalog_fails_no_call(stack: Stack) -> None:
    catalogs = stack.start_platform(catalog=3, delivery=MANY_COURIERS)["catalog"]
    customer = stack.customer()
    failures: list[aio.AioRpcError] = []
    succeeded = 0
    stop = asyncio.Event()

    async with (
        mesh.channel("orders", consul=stack.settings) as orders_channel,
        mesh.channel("catalog", consul=stack.settings) as catalog_channel,
    ):
        orders_stub = orders_pb2_grpc.OrderServiceStub(orders_channel)
        catalog_stub = catalog_pb2_grpc.CatalogServiceStub(catalog_channel)
        assert await catalog_channel.wait_for_endpoints(10)
        await wait_until_async(
            lambda: len(catalog_channel.endpoints) == 3,
            timeout=10,
            message="the catalog channel never saw 3 endpoints",
        )
        victim = subchannel_of(catalog_channel, catalogs[0])
        attempts_at_first_failure: list[int] = []
        record = catalog_channel.upstream.record
        armed = asyncio.Event()

        def watching(sub: SubChannel, started: float, classified: Classified) -> None:
            if sub is victim and classified.is_failure and not attempts_at_first_failure:
                attempts_at_first_failure.append(sub.attempts)
            record(sub, started, classified)
            if sub is victim and armed.is_set() and not catalogs[0].stopped:
                # Killed right after it answered: it is in the rotation (a fresh, low latency
                # estimate), so the next calls pick it. Killed at a random moment, it may have
                # been avoided for a slow answer and leave Consul's catalog before any call
                # tries it, which proves nothing about ejection.
                catalogs[0].stop(signal.SIGKILL)

        catalog_channel.upstream.record = watching  # type: ignore[method-assign]

        async def steady(worker: int) -> None:
            nonlocal succeeded
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if worker % 2:
                        await orders_stub.PlaceOrder(
                            order(f"kill-{worker}-{n}", customer=customer), timeout=10
                        )
                    else:
                        await catalog_stub.GetItem(GET_ITEM, timeout=10)
                    succeeded += 1
                except aio.AioRpcError as exc:
                    failures.append(exc)

        workers = [asyncio.create_task(steady(i)) for i in range(6)]
        await wait_until_async(
            lambda: succeeded >= 60 and victim.attempts >= 5,
            timeout=30,
            message="no traffic reached every catalog",
        )
        armed.set()
        await wait_until_async(
            lambda: catalogs[0].stopped, timeout=30, message="the victim answered no more calls"
        )
        after = succeeded
        await wait_until_async(
            lambda: succeeded >= after + 150, timeout=60, message="traffic stopped after the kill"
        )
        stop.set()
        await asyncio.gather(*workers)

    assert failures == [], [f"{e.code()}: {e.details()}" for e in failures[:5]]
    assert attempts_at_first_failure, "the killed instance was never seen failing"
    assert victim.attempts == attempts_at_first_failure[0], (
        "the killed endpoint got new attempts after its first failure"
    )


async def test_failing_catalogs_open_the_breaker_then_recover(stack: Stack) -> None:
    failing = [stack.start("catalog", *FAILING) for _ in range(2)]
    # health checks are exempt from injected faults: the failing catalogs pass too
    (orders,) = stack.start_platform(catalog=0)["orders"]
    customer = stack.customer()
    loop = asyncio.get_running_loop()
    # This test's own breaker towards orders would open first (orders answers UNAVAILABLE
    # while catalog fails); switch it off to watch the breaker inside orders.
    patient = ServicePolicy(breaker=BreakerPolicy(minimum_calls=1_000_000))

    async with mesh.channel("orders", consul=stack.settings, policy=patient) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)

        async def place(key: str) -> tuple[aio.AioRpcError | None, float]:
            started = loop.time()
            try:
                placed = await stub.PlaceOrder(order(key, customer=customer), timeout=10)
            except aio.AioRpcError as exc:
                return exc, loop.time() - started
            assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
            return None, loop.time() - started

        for n in range(100):
            error, elapsed = await place(f"breaker-{n}")
            assert error is not None
            if "circuit for service 'catalog' is open" in (error.details() or ""):
                break
        else:
            pytest.fail("the breaker never opened")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 0.5, "an open circuit fails at once, far under the 10 s deadline"

        stopped = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in failing))
        assert stopped == [0, 0]
        healthy = [stack.start("catalog") for _ in range(2)]
        stack.wait_passing("catalog", {p.port for p in healthy})

        async def recovered() -> bool:
            return (await place(f"recovered-{loop.time()}"))[0] is None

        await wait_until_async(
            recovered,
            timeout=30,
            interval=0.5,
            message="orders never recovered after catalog came back",
        )
    assert orders.proc.poll() is None, "orders was not restarted"
    assert "circuit" in orders.log()


async def test_retry_storm_stays_within_the_budget(stack: Stack) -> None:
    failing = [stack.start("catalog", *FAILING) for _ in range(2)]
    stack.wait_passing("catalog", 2)
    # The breaker and ejection would stop the storm first; switch them off to see the budget.
    policy = ServicePolicy(
        breaker=BreakerPolicy(minimum_calls=1_000_000),
        ejection=EjectionPolicy(consecutive_failures=1_000_000),
    )
    calls = 600
    async with mesh.channel("catalog", consul=stack.settings, policy=policy) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        assert await channel.wait_for_endpoints(10)
        await wait_until_async(
            lambda: len(channel.endpoints) == 2,
            timeout=10,
            message="the channel never saw both instances",
        )
        semaphore = asyncio.Semaphore(8)

        async def one() -> grpc.StatusCode:
            async with semaphore:
                try:
                    await stub.GetItem(GET_ITEM, timeout=5)
                except aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        codes = await asyncio.gather(*[one() for _ in range(calls)])
        attempts = sum(s.attempts for s in channel.upstream.pool.subchannels())
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    floor = policy.budget.min_retries_per_second * policy.budget.ttl
    ratio = attempts / calls
    assert 1.0 < ratio <= 1 + policy.budget.ratio + floor / calls + 0.02, ratio
    assert ratio < 1.5, "without a budget every call would make 3 attempts"
    assert all(p.proc.poll() is None for p in failing)


async def test_slow_instance_gets_less_traffic(stack: Stack) -> None:
    fast = [stack.start("catalog"), stack.start("catalog")]
    slow = stack.start("catalog", "--fault-delay", "0.05", "--fault-delay-percent", "100")
    stack.wait_passing("catalog", 3)
    async with mesh.channel("catalog", consul=stack.settings) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        await channel.wait_for_endpoints(10)
        await wait_until_async(
            lambda: len(channel.endpoints) == 3,
            timeout=10,
            message="the channel never saw 3 instances",
        )
        semaphore = asyncio.Semaphore(6)

        async def one() -> None:
            async with semaphore:
                await stub.GetItem(GET_ITEM, timeout=5)

        await asyncio.gather(*[one() for _ in range(400)])
        shares = {p.port: subchannel_of(channel, p).attempts / 400 for p in (*fast, slow)}
    assert shares[slow.port] < 0.15, shares
    assert all(shares[p.port] > 0.3 for p in fast), shares


class RecordingCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    """A catalog that notes how much time each call arrived with."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    async def GetItem(self, request: Any, context: aio.ServicerContext) -> catalog_pb2.Item:
        self.remaining.append(context.time_remaining())
        return catalog_pb2.Item(
            item_id=request.item_id,
            restaurant_id="r",
            name="n",
            price_cents=100,
            currency="EUR",
            available=True,
        )


async def test_deadline_of_place_order_reaches_catalog(stack: Stack) -> None:
    recording = RecordingCatalog()
    catalog = MeshServer(
        ServerConfig("catalog", port=0, check_interval=1.0, drain_delay=0), consul=stack.settings
    )
    catalog.add_service(
        catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"],
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server,
        recording,
    )
    await catalog.start()
    try:
        # no catalog process: the recording catalog (not in stack.processes) is the only one
        await asyncio.to_thread(stack.start_platform, catalog=0)
        await wait_until_async(
            lambda: len(stack.passing("catalog")) == 1,
            timeout=30,
            message="the recording catalog never passed",
        )
        customer = await asyncio.to_thread(stack.customer)
        async with mesh.channel("orders", consul=stack.settings) as channel:
            stub = orders_pb2_grpc.OrderServiceStub(channel)
            # without a deadline first: orders' channels have all resolved before the short one
            placed = await stub.PlaceOrder(order("deadline-1", customer=customer, item="any"))
            await stub.PlaceOrder(order("deadline-2", customer=customer, item="any"), timeout=0.3)
    finally:
        await catalog.stop()
    assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED, placed
    default, short = recording.remaining
    assert short is not None and 0 < short < 0.3
    assert default is not None and default > 1


async def test_place_order_is_not_retried_once_it_reached_orders(stack: Stack) -> None:
    stack.start("orders", *FAILING)
    (healthy,) = stack.start_platform(delivery=MANY_COURIERS)["orders"]
    customer = stack.customer()
    errors = 0
    async with mesh.channel("orders", consul=stack.settings) as channel:
        stub = orders_pb2_grpc.OrderServiceStub(channel)
        await channel.wait_for_endpoints(10)
        await wait_until_async(
            lambda: len(channel.endpoints) == 2,
            timeout=10,
            message="the channel never saw both orders instances",
        )
        for n in range(20):
            for _ in range(10):  # the caller retries with the same key until it succeeds
                try:
                    await stub.PlaceOrder(order(f"caller-retry-{n}", customer=customer), timeout=10)
                    break
                except aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert "injected fault" in (exc.details() or "")
                    errors += 1
    assert errors > 0, "the mesh must not retry PlaceOrder after it reached a server"
    assert count_orders(stack) == 20
    assert healthy.proc.poll() is None
