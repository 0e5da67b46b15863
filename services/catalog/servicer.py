"""foodmesh.catalog.v1.CatalogService on top of CatalogStore.

Bad input ends with INVALID_ARGUMENT or NOT_FOUND and a message that names the field, so a
caller can fix the request without reading server logs. Paging follows Google AIP-158:
page_size 0 means the default, values above the maximum are lowered to it, and page_token is
opaque to callers: it carries the last item_id returned and the restaurant_id filter it was
issued for, so a token sent with another filter is refused instead of silently mixing lists.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import grpc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from services.catalog.store import CatalogItem, CatalogStore

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN_VERSION = 1

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

    async def ListItems(
        self, request: catalog_pb2.ListItemsRequest, context: ServicerContext
    ) -> catalog_pb2.ListItemsResponse:
        if request.page_size < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must not be negative, got {request.page_size}",
            )
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after_item_id = ""
        if request.page_token:
            try:
                token = PageToken.decode(request.page_token)
            except ValueError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            if token.restaurant_id != request.restaurant_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"page_token was issued for restaurant_id {token.restaurant_id!r}, not "
                    f"{request.restaurant_id!r}: send the same restaurant_id on every page",
                )
            after_item_id = token.after_item_id
        page = await self._store.list_items(request.restaurant_id, after_item_id, page_size)
        next_page_token = ""
        if page.has_more:
            next_page_token = PageToken(request.restaurant_id, page.items[-1].item_id).encode()
        return catalog_pb2.ListItemsResponse(
            items=[item_message(item) for item in page.items], next_page_token=next_page_token
        )


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where the next page starts, and the restaurant_id filter the token belongs to."""

    restaurant_id: str
    after_item_id: str

    def encode(self) -> str:
        """URL-safe base64 (no padding) of a small JSON object."""
        payload = {"v": _PAGE_TOKEN_VERSION, "r": self.restaurant_id, "a": self.after_item_id}
        data = json.dumps(payload, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str) -> PageToken:
        """Parse a token made by encode(); ValueError (naming page_token) when it is not one."""
        malformed = ValueError(
            "page_token is malformed: send the next_page_token of the previous ListItems "
            "response unchanged, or an empty page_token for the first page"
        )
        try:
            data = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
            payload = json.loads(data)
        except (binascii.Error, UnicodeError, ValueError):
            raise malformed from None
        if not (
            isinstance(payload, dict)
            and payload.get("v") == _PAGE_TOKEN_VERSION
            and isinstance(payload.get("r"), str)
            and isinstance(payload.get("a"), str)
        ):
            raise malformed
        return cls(restaurant_id=payload["r"], after_item_id=payload["a"])


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
