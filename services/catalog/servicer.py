"""foodmesh.catalog.v1.CatalogService on top of CatalogStore.

Bad input ends with INVALID_ARGUMENT or NOT_FOUND and a message that names the field, so a
caller can fix the request without reading server logs. Paging is services/paging.py's
(Google AIP-158): the token carries the last item_id returned and the restaurant_id filter.
"""

from __future__ import annotations

import re

import grpc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from services.catalog.store import CatalogItem, CatalogStore, ItemMoved
from services.paging import PageToken, page_size
from services.refusals import failed_precondition, invalid, not_found, refusing

CURRENCY = re.compile(r"[A-Z]{3}")

ServicerContext = grpc.aio.ServicerContext[object, object]


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """Answers GetItem and ListItems from the catalog database, and keeps it (PutItem)."""

    def __init__(self, store: CatalogStore) -> None:
        self._store = store

    async def GetItem(
        self, request: catalog_pb2.GetItemRequest, context: ServicerContext
    ) -> catalog_pb2.Item:
        if not request.item_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "item_id must not be empty")
        item = await self._store.get_item(request.item_id)
        if item is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"item_id {request.item_id!r}: no such item"
            )
        return item_message(item)

    @refusing
    async def ListItems(
        self, request: catalog_pb2.ListItemsRequest, context: ServicerContext
    ) -> catalog_pb2.ListItemsResponse:
        size = page_size(request.page_size)
        after_item_id = PageToken.resume(
            request.page_token, rpc="ListItems", field="restaurant_id", scope=request.restaurant_id
        )
        page = await self._store.list_items(request.restaurant_id, after_item_id, size)
        next_page_token = ""
        if page.has_more:
            next_page_token = PageToken(request.restaurant_id, page.items[-1].item_id).encode()
        return catalog_pb2.ListItemsResponse(
            items=[item_message(item) for item in page.items], next_page_token=next_page_token
        )

    @refusing
    async def PutItem(
        self, request: catalog_pb2.PutItemRequest, context: ServicerContext
    ) -> catalog_pb2.Item:
        item = _item_of(request)
        try:
            return item_message(await self._store.put_item(item))
        except KeyError:
            raise not_found(
                f"item.restaurant_id {item.restaurant_id!r}: no such restaurant"
            ) from None
        except ItemMoved as moved:
            raise failed_precondition(
                f"item.item_id {item.item_id!r} is an item of restaurant"
                f" {moved.current.restaurant_id!r}, not of {item.restaurant_id!r}"
            ) from None


def _item_of(request: catalog_pb2.PutItemRequest) -> CatalogItem:
    if not request.HasField("item"):
        raise invalid("item is required")
    item = request.item
    for field in ("item_id", "restaurant_id", "name"):
        if not getattr(item, field).strip():
            raise invalid(f"item.{field} must not be empty")
    if item.price_cents < 0:
        raise invalid(f"item.price_cents must not be negative, got {item.price_cents}")
    if not CURRENCY.fullmatch(item.currency):
        raise invalid(f"item.currency must be an ISO 4217 code like 'EUR', got {item.currency!r}")
    return CatalogItem(
        item_id=item.item_id,
        restaurant_id=item.restaurant_id,
        name=item.name,
        description=item.description,
        price_cents=item.price_cents,
        currency=item.currency,
        available=item.available,
    )


def item_message(item: CatalogItem) -> catalog_pb2.Item:
    """The wire form of a catalog item."""
    return catalog_pb2.Item(
        item_id=item.item_id,
        restaurant_id=item.restaurant_id,
        name=item.name,
        description=item.description,
        price_cents=item.price_cents,
        currency=item.currency,
        available=item.available,
    )
