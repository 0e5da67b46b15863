"""Following a paged list (AIP-158) to its end, for the tests of every service that pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def all_pages(page: Callable[[str], Awaitable[tuple[Sequence[T], str]]]) -> list[T]:
    """Every item of a paged list: `page(token)` is one page's items and the next page's
    token, "" after the last."""
    found: list[T] = []
    token = ""
    while True:
        items, token = await page(token)
        found += items
        if not token:
            return found
