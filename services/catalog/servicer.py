"""foodmesh.catalog.v1.CatalogService on top of CatalogStore.

Bad input ends with INVALID_ARGUMENT or NOT_FOUND and a message that names the field, so a
caller can fix the request without reading server logs. Paging is services/paging.py's
(Google AIP-158): the token carries the last item_id returned and the restaurant_id filter.
"""

from __future__ import annotations

import grpc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from services.catalog.store import CatalogItem, CatalogStore
from services.paging import PageToken, page_size
from services.refusals import refusing

ServicerContext = grpc.aio.ServicerContext[object, object]


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """Answers GetItem and ListItems from the catalog database."""

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
