"""What the gateway knows about the call it is serving, shared by its layers.

The access log (the outermost of the gateway's layers) makes one GatewayCall per call and puts
it in context; authentication writes the verified user into it, rate limiting its decision,
the router reads the user and the request id from it to send them on, and the access log
writes its line from it when the call ends.
"""

from __future__ import annotations

import contextvars
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

REQUEST_ID = "x-request-id"
LOOPBACK_PEER = "x-gateway-peer"
"""Set by the gateway's HTTP port on the calls it makes to its own gRPC port: the secret
below and the HTTP client's address, which then counts as the call's peer."""
LOOPBACK_SECRET = secrets.token_urlsafe(24)
"""Known to this process only: a client cannot pose as the HTTP port to choose its address."""


@dataclass(slots=True)
class GatewayCall:
    request_id: str
    peer: str | None = None
    """The client's address."""
    user: str | None = None
    """The subject of the call's verified token, if it had one."""
    auth: str = "-"
    """`ok`, `anonymous`, or why a token was refused (meshkit/gateway/tokens.py's reasons)."""
    rate_limit: str = "-"
    """`allowed` or `limited`."""

    @property
    def consumer(self) -> str:
        """Whom rate limits count: the user, else the client's address."""
        return f"user:{self.user}" if self.user else f"addr:{self.peer or '?'}"


current_call: contextvars.ContextVar[GatewayCall | None] = contextvars.ContextVar(
    "gateway_call", default=None
)


def request_id_of(metadata: Iterable[tuple[str, Any]]) -> str:
    """The client's x-request-id, or a new one."""
    for key, value in metadata:
        if key == REQUEST_ID and value:
            return str(value)[:128]
    return uuid.uuid4().hex


def peer_host(peer: str | None) -> str | None:
    """The client's address of grpc's peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`)."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or None
    return None


def call_of(context: Any) -> GatewayCall:
    """The call in context, made now from `context` (a grpc.aio ServicerContext) if no layer
    made it yet."""
    call = current_call.get()
    if call is None:
        call = new_call(context)
        current_call.set(call)
    return call


def new_call(context: Any) -> GatewayCall:
    """The record of the call `context` serves: its request id, and its client's address
    (the HTTP client's, for a call from the gateway's own HTTP port)."""
    metadata = tuple(context.invocation_metadata() or ())
    peer = peer_host(context.peer())
    for key, value in metadata:
        if key == LOOPBACK_PEER:
            secret, _, address = str(value).partition(" ")
            if secrets.compare_digest(secret, LOOPBACK_SECRET) and address:
                peer = address
    return GatewayCall(request_id_of(metadata), peer)
