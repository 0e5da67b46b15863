"""Who is calling, as the gateway says: the `x-user-id` metadata it sets from a verified token.

The gateway strips any `x-user-id` a client sends and sets its own from the token it verified
(meshkit/gateway/router.py), so a call that carries one came through the gateway for that
user; a call without one came from inside the mesh (a saga step, an operator), which may act
for anyone. Until mTLS lets a service tell the gateway's calls apart by certificate, a service
trusts the header from any caller inside the mesh.
"""

from __future__ import annotations

from typing import Any

import grpc

USER_ID = "x-user-id"


def calling_user(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The user the call is made for, when it came through the gateway; else None."""
    for key, value in context.invocation_metadata() or ():
        if key == USER_ID and value:
            return str(value)
    return None
