"""foodmesh.notifications.v1.NotificationService on top of NotificationsStore.

Watches poll the database (every WATCH_POLL_S) for notifications made by any instance, and
wake at once for those this instance made (`changed()`, called by its consumer).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from foodmesh.notifications.v1 import notifications_pb2, notifications_pb2_grpc
from services.notifications.store import NotificationsStore
from services.paging import PageToken, page_size
from services.refusals import Refusal, invalid, refusing, status_of

WATCH_POLL_S = 0.25
ServicerContext = grpc.aio.ServicerContext[Any, Any]


class NotificationServicer(notifications_pb2_grpc.NotificationServiceServicer):
    """Answers ListNotifications and WatchNotifications from the notifications database."""

    def __init__(self, store: NotificationsStore) -> None:
        self._store = store
        self._changed = asyncio.Condition()

    def changed(self) -> None:
        """This instance made a notification: wake the watches."""
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @refusing
    async def ListNotifications(
        self, request: notifications_pb2.ListNotificationsRequest, context: ServicerContext
    ) -> notifications_pb2.ListNotificationsResponse:
        _require_user(request.user_id)
        size = page_size(request.page_size)
        after = PageToken.resume(
            request.page_token, rpc="ListNotifications", field="user_id", scope=request.user_id
        )
        before = _position(after)
        page = await self._store.page(request.user_id, before, size)
        token = (
            PageToken(request.user_id, str(page.last_position)).encode() if page.has_more else ""
        )
        return notifications_pb2.ListNotificationsResponse(
            notifications=page.notifications, next_page_token=token
        )

    async def WatchNotifications(
        self, request: notifications_pb2.WatchNotificationsRequest, context: ServicerContext
    ) -> AsyncIterator[notifications_pb2.Notification]:
        try:
            _require_user(request.user_id)
        except Refusal as refusal:
            status = status_of(refusal)
            assert status is not None
            await context.abort(*status)
        position = 0
        while True:
            for shown, notification in await self._store.after(request.user_id, position):
                yield notification
                position = shown
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), WATCH_POLL_S)
                except TimeoutError:
                    pass


def _require_user(user_id: str) -> None:
    if not user_id.strip():
        raise invalid("user_id must not be empty")


def _position(after: str) -> int:
    if not after:
        return 0
    try:
        position = int(after)
    except ValueError:
        position = -1
    if not 0 <= position < 2**63:  # a position is a BIGINT
        raise invalid("page_token is malformed: send the next_page_token unchanged")
    return position
