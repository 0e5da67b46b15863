"""CatalogService on a real in-process grpc.aio server, called through the generated stub, with
its store on each engine (a SQLite file, a Postgres database)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from mesh.testing import InProcessServer
from meshkit.storage.database import open_database
from services.catalog.servicer import CatalogServicer
from services.catalog.store import (
    DEMO_MENU,
    DEMO_RESTAURANT_IDS,
    CatalogItem,
    CatalogStore,
    ItemMoved,
)
from services.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from tests.conftest import Locate
from tests.paging import all_pages
from tests.unit.demo_services import (
    AVAILABLE_ITEM_ID,
    UNAVAILABLE_ITEM_ID,
    catalog_server,
    count_rows,
    rpc_error,
)

if TYPE_CHECKING:
    from foodmesh.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as CatalogStub


@pytest.fixture
def catalog_db(locate: Locate) -> Path | str:
    return locate("catalog")


@pytest.fixture
async def catalog(catalog_db: Path | str) -> AsyncIterator[CatalogStub]:
    async with catalog_server(catalog_db) as server:
        yield catalog_pb2_grpc.CatalogServiceStub(server.channel)


async def list_all(stub: CatalogStub, restaurant_id: str, page_size: int) -> list[str]:
    """Every item_id, following next_page_token until it is empty."""

    async def page(token: str) -> tuple[list[str], str]:
        answer = await stub.ListItems(
            catalog_pb2.ListItemsRequest(
                restaurant_id=restaurant_id, page_size=page_size, page_token=token
            )
        )
        assert len(answer.items) <= page_size
        return [item.item_id for item in answer.items], answer.next_page_token

    return await all_pages(page)


async def test_seeding_is_idempotent_across_instances_on_one_database(
    catalog_db: Path | str,
) -> None:
    first, second = await asyncio.gather(
        CatalogStore.open(catalog_db), CatalogStore.open(catalog_db)
    )
    await first.close()
    await second.close()
    async with await CatalogStore.open(catalog_db):
        pass
    assert await count_rows(catalog_db, "items") == len(DEMO_MENU)
    assert await count_rows(catalog_db, "meta") == 2  # the seed, and its events
    # The menu's events are in the outbox once: an ItemChanged per item, a RestaurantChanged
    # per restaurant.
    assert await count_rows(catalog_db, "events") == len(DEMO_MENU) + len(DEMO_RESTAURANT_IDS)


async def test_a_put_item_records_one_event_per_change_and_none_for_a_repeat(
    catalog_db: Path | str,
) -> None:
    async with await CatalogStore.open(catalog_db) as store:
        seeded = await count_rows(catalog_db, "events")
        item = await store.get_item(AVAILABLE_ITEM_ID)
        assert item is not None
        renamed = dataclasses.replace(item, name="Pizza Margherita", price_cents=990)
        assert await store.put_item(renamed) == renamed
        assert await store.put_item(renamed) == renamed  # a retry
        assert await store.get_item(AVAILABLE_ITEM_ID) == renamed
        assert await count_rows(catalog_db, "events") == seeded + 1
        added = dataclasses.replace(item, item_id="roma-calzone", name="Calzone")
        await store.put_item(added)
        assert await count_rows(catalog_db, "events") == seeded + 2
        with pytest.raises(KeyError):
            await store.put_item(dataclasses.replace(item, restaurant_id="nowhere"))
        with pytest.raises(ItemMoved):
            await store.put_item(dataclasses.replace(item, restaurant_id="green-bowl"))
        assert await count_rows(catalog_db, "events") == seeded + 2


async def test_reopening_keeps_an_operators_edits(catalog_db: Path | str) -> None:
    async with await CatalogStore.open(catalog_db):
        pass
    async with await open_database(catalog_db) as database:
        async with database.transaction() as transaction:
            await transaction.execute("DELETE FROM items WHERE item_id = ?", (AVAILABLE_ITEM_ID,))
    async with await CatalogStore.open(catalog_db) as store:
        assert await store.get_item(AVAILABLE_ITEM_ID) is None
    assert await count_rows(catalog_db, "items") == len(DEMO_MENU) - 1


def test_demo_menu_has_fixed_unique_ids_and_one_currency() -> None:
    assert len({item.item_id for item in DEMO_MENU}) == len(DEMO_MENU)
    assert {item.restaurant_id for item in DEMO_MENU} == set(DEMO_RESTAURANT_IDS)
    assert len({item.currency for item in DEMO_MENU}) == 1
    assert any(not item.available for item in DEMO_MENU)


async def test_get_item_returns_the_seeded_item(catalog: CatalogStub) -> None:
    item = await catalog.GetItem(catalog_pb2.GetItemRequest(item_id=AVAILABLE_ITEM_ID))
    assert item.restaurant_id == "trattoria-roma"
    assert item.price_cents == 850
    assert item.currency == "EUR"
    assert item.available

    unavailable = await catalog.GetItem(catalog_pb2.GetItemRequest(item_id=UNAVAILABLE_ITEM_ID))
    assert not unavailable.available


async def test_get_item_without_item_id_is_invalid_argument(catalog: CatalogStub) -> None:
    error = await rpc_error(catalog.GetItem(catalog_pb2.GetItemRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "item_id must not be empty"


async def test_get_unknown_item_is_not_found_naming_it(catalog: CatalogStub) -> None:
    error = await rpc_error(catalog.GetItem(catalog_pb2.GetItemRequest(item_id="no-such-dish")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-dish" in (error.details() or "")


@pytest.mark.parametrize("page_size", [1, 3, 4, 10, 11])
async def test_pages_walk_every_item_once_in_item_id_order(
    catalog: CatalogStub, page_size: int
) -> None:
    item_ids = await list_all(catalog, "", page_size)
    assert item_ids == sorted(item.item_id for item in DEMO_MENU)


@pytest.mark.parametrize("restaurant_id", DEMO_RESTAURANT_IDS)
async def test_pages_filtered_by_restaurant(catalog: CatalogStub, restaurant_id: str) -> None:
    item_ids = await list_all(catalog, restaurant_id, 2)
    expected = sorted(i.item_id for i in DEMO_MENU if i.restaurant_id == restaurant_id)
    assert item_ids == expected


async def test_unknown_restaurant_is_an_empty_last_page(catalog: CatalogStub) -> None:
    page = await catalog.ListItems(catalog_pb2.ListItemsRequest(restaurant_id="nowhere"))
    assert list(page.items) == []
    assert page.next_page_token == ""


async def test_page_size_zero_means_default_and_large_is_lowered(locate: Locate) -> None:
    many = tuple(
        CatalogItem(f"item-{n:05}", "big-kitchen", f"Dish {n}", "", 100, "EUR", True)
        for n in range(MAX_PAGE_SIZE + 5)
    )
    async with await CatalogStore.open(locate("catalog"), seed=many) as store:
        add = catalog_pb2_grpc.add_CatalogServiceServicer_to_server
        async with InProcessServer((add, CatalogServicer(store))) as server:
            stub = catalog_pb2_grpc.CatalogServiceStub(server.channel)
            default_page = await stub.ListItems(catalog_pb2.ListItemsRequest(page_size=0))
            largest_page = await stub.ListItems(catalog_pb2.ListItemsRequest(page_size=5000))
    assert len(default_page.items) == DEFAULT_PAGE_SIZE
    assert len(largest_page.items) == MAX_PAGE_SIZE
    assert largest_page.next_page_token


async def test_negative_page_size_is_invalid_argument(catalog: CatalogStub) -> None:
    error = await rpc_error(catalog.ListItems(catalog_pb2.ListItemsRequest(page_size=-1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in (error.details() or "")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "%%%",
        _b64("not json"),
        _b64("[1, 2]"),
        _b64('{"v": 1, "r": ""}'),
        _b64('{"v": 2, "r": "", "a": "x"}'),
        _b64('{"v": 1, "r": 5, "a": "x"}'),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
async def test_malformed_page_token_is_invalid_argument(catalog: CatalogStub, token: str) -> None:
    error = await rpc_error(catalog.ListItems(catalog_pb2.ListItemsRequest(page_token=token)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (error.details() or "")


async def test_page_token_used_with_another_restaurant_is_invalid_argument(
    catalog: CatalogStub,
) -> None:
    first = await catalog.ListItems(
        catalog_pb2.ListItemsRequest(restaurant_id="trattoria-roma", page_size=1)
    )
    assert first.next_page_token
    for other_filter in ("sakura-sushi", ""):
        error = await rpc_error(
            catalog.ListItems(
                catalog_pb2.ListItemsRequest(
                    restaurant_id=other_filter, page_size=1, page_token=first.next_page_token
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (error.details() or "")
