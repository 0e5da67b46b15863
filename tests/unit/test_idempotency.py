"""IdempotencyLedger on a real database (a SQLite file, and a Postgres database) opened by two
connections, as two instances of a service open it: duplicates return the first response, a
reused key with another request is refused, and concurrent duplicates produce one effect."""

from __future__ import annotations

import asyncio

import pytest

from foodmesh.orders.v1 import orders_pb2
from meshkit.storage import idempotency
from meshkit.storage.database import Database, open_database
from meshkit.storage.idempotency import IdempotencyConflict, IdempotencyLedger, key_problem
from meshkit.storage.schema import Schema
from tests.conftest import Locate

SCHEMA = (
    idempotency.SCHEMA,
    Schema.of("effects", "CREATE TABLE IF NOT EXISTS effects (n INTEGER)"),
)
LEDGER = IdempotencyLedger("test.Service/Do")


def request(key: str, customer: str = "alice") -> orders_pb2.PlaceOrderRequest:
    """Any message with an idempotency_key field will do."""
    return orders_pb2.PlaceOrderRequest(customer_id=customer, idempotency_key=key)


async def do(database: Database, message: orders_pb2.PlaceOrderRequest) -> orders_pb2.Order:
    """The effect (one row) and its response, deduplicated by the message's key."""
    async with database.transaction() as transaction:
        key = LEDGER.key_of(message)
        earlier = await LEDGER.recall(transaction, key, orders_pb2.Order)
        if earlier is not None:
            return earlier
        await asyncio.sleep(0.01)  # a slow effect: a duplicate must wait, not slip in
        await transaction.execute("INSERT INTO effects (n) VALUES (1)")
        row = await transaction.fetch_one("SELECT COUNT(*) FROM effects")
        assert row is not None
        response = orders_pb2.Order(order_id=f"effect-{row[0]}", customer_id=message.customer_id)
        await LEDGER.remember(transaction, key, response)
        return response


async def effects(database: Database) -> int:
    row = await database.fetch_one("SELECT COUNT(*) FROM effects")
    assert row is not None
    return int(row[0])


async def test_same_key_same_request_returns_the_first_response(locate: Locate) -> None:
    async with await open_database(locate("s"), schema=SCHEMA) as database:
        first = await do(database, request("k"))
        again = await do(database, request("k"))
        assert again == first and await effects(database) == 1
        other = await do(database, request("k2"))
        assert other.order_id != first.order_id and await effects(database) == 2


async def test_no_key_means_no_deduplication(locate: Locate) -> None:
    async with await open_database(locate("s"), schema=SCHEMA) as database:
        await do(database, request(""))
        await do(database, request(""))
        assert await effects(database) == 2


async def test_a_reused_key_with_another_request_is_refused_and_changes_nothing(
    locate: Locate,
) -> None:
    async with await open_database(locate("s"), schema=SCHEMA) as database:
        await do(database, request("k", "alice"))
        with pytest.raises(IdempotencyConflict, match="idempotency_key 'k'"):
            await do(database, request("k", "bob"))
        assert await effects(database) == 1


async def test_keys_are_scoped_by_method(locate: Locate) -> None:
    async with await open_database(locate("s"), schema=SCHEMA) as database:
        async with database.transaction() as transaction:
            key = LEDGER.key_of(request("k"))
            await LEDGER.remember(transaction, key, orders_pb2.Order(order_id="a"))
            other = IdempotencyLedger("test.Service/Undo")
            found = await other.recall(transaction, other.key_of(request("k")), orders_pb2.Order)
            assert found is None


async def test_concurrent_duplicates_on_two_connections_have_one_effect(locate: Locate) -> None:
    path = locate("s")
    async with (
        await open_database(path, schema=SCHEMA) as one,
        await open_database(path, schema=SCHEMA) as two,
    ):
        responses = await asyncio.gather(
            *(do(one if i % 2 else two, request("k")) for i in range(10))
        )
        assert len({r.order_id for r in responses}) == 1
        assert await effects(one) == 1


def test_an_overlong_key_is_named() -> None:
    assert key_problem("k" * 255) is None
    problem = key_problem("k" * 256)
    assert problem is not None and "idempotency_key" in problem and "255" in problem
