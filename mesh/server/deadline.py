"""The server side of deadline propagation: each servicer runs with its call's deadline.

`DeadlineInterceptor` turns each inbound call's remaining time into a Deadline
(mesh/core/deadline.py) and runs the servicer with it in context, so that each call, and each
task it starts, sees its own and its outbound calls inherit it; it refuses to start a call
whose deadline has already passed (it waited in a queue too long): the work would be thrown
away. It runs around the servicer through mesh/server/hooks.py.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import grpc
from grpc import aio

from mesh.core.deadline import Clock, Deadline, reset_inbound_deadline, set_inbound_deadline
from mesh.server.hooks import BehaviorInterceptor, Exit, Hook


class DeadlineInterceptor(BehaviorInterceptor):
    """Runs each servicer with its call's deadline in context; refuses calls already late.

    `clock` must be the clock outbound calls use (`outbound_timeout`'s); it is injectable
    for tests.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__()
        self._clock = clock

    def hook_for(self, method: str) -> Hook:
        clock = self._clock

        async def enter(context: aio.ServicerContext[Any, Any]) -> Exit:
            remaining: float | None = context.time_remaining()
            deadline = None if remaining is None else Deadline(clock() + remaining)
            if deadline is not None and deadline.expired(clock):
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{method}: the call's deadline passed before the server started it",
                )
            token = set_inbound_deadline(deadline)

            def leave() -> None:
                # A response stream dropped unfinished is closed later from another context,
                # where the token is not valid; that context ends with the call anyway.
                with contextlib.suppress(ValueError):
                    reset_inbound_deadline(token)

            return leave

        return enter
