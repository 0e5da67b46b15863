"""Database per service on Postgres, as the database enforces it: a throwaway cluster
(Debian's postgresql, scripts/postgres_server.py) where each service's role owns its own
database and may not even connect to another service's."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from scripts.postgres_server import PostgresServer

SERVICES = ("users", "catalog", "orders", "payments", "delivery", "notifications", "order-history")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


async def test_each_service_owns_its_database(postgres: PostgresServer) -> None:
    for service in SERVICES:
        connection = await asyncpg.connect(postgres.service_database(service), timeout=10)
        try:
            await connection.execute("CREATE TABLE IF NOT EXISTS things (id text PRIMARY KEY)")
            await connection.execute(
                "INSERT INTO things VALUES ($1) ON CONFLICT DO NOTHING", service
            )
            assert await connection.fetchval("SELECT id FROM things") == service
            assert await connection.fetchval("SELECT current_database()") == service.replace(
                "-", "_"
            )
        finally:
            await connection.close()


async def test_a_role_cannot_reach_another_services_database(postgres: PostgresServer) -> None:
    postgres.service_database("orders")
    postgres.service_database("payments")
    orders_password = postgres.passwords["orders"]
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
        await asyncpg.connect(postgres.url("orders", orders_password, "payments"), timeout=10)
    assert "permission denied for database" in str(refused.value)
    assert "payments" in str(refused.value)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.url("orders", "not-the-password", "orders"), timeout=10)
