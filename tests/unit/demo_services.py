"""The demo services on real in-process servers, for the tests of catalog and orders: what
both test modules share, so that neither imports the other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from foodmesh.catalog.v1 import catalog_pb2_grpc
from mesh.testing import InProcessServer
from meshkit.storage.database import open_database
from services.catalog.servicer import CatalogServicer
from services.catalog.store import CatalogStore

AVAILABLE_ITEM_ID = "roma-margherita"
UNAVAILABLE_ITEM_ID = "roma-truffle-risotto"


@asynccontextmanager
async def catalog_server(location: Path | str) -> AsyncIterator[InProcessServer]:
    """A catalog service on the database at `location` (a SQLite file or a Postgres URL)."""
    async with await CatalogStore.open(location) as store:
        servicer = CatalogServicer(store)
        add = catalog_pb2_grpc.add_CatalogServiceServicer_to_server
        async with InProcessServer((add, servicer)) as server:
            yield server


async def count_rows(location: Path | str, table: str) -> int:
    """The number of rows of a table, read through a connection of its own (to a SQLite file
    or a Postgres database)."""
    async with await open_database(location) as database:
        row = await database.fetch_one(f"SELECT COUNT(*) FROM {table}")
    assert row is not None
    return int(row[0])


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    """The error an awaited stub call ends with; fails the test if it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value
