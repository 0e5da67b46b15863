"""gRPC-Web on the gateway's HTTP port, as Envoy's grpc_web filter does it.

A browser cannot speak gRPC (it has no HTTP/2 trailers to read), so gRPC-Web puts the
trailers in the body: a request is the call's length-prefixed messages in an HTTP/1.1 or
HTTP/2 POST (`application/grpc-web+proto`, or base64 text in `application/grpc-web-text`), and
the response is the answer's messages followed by one frame flagged 0x80 that carries
`grpc-status`, `grpc-message` and the trailers as HTTP header lines. Unary and server-streaming
calls are what browsers make (the protocol has no client streams); each is forwarded to the
gateway's own gRPC port as bytes, like the router forwards (no message is parsed here), so the
same authentication, limits and routing apply.
"""

from __future__ import annotations

import base64
import binascii
import struct
import urllib.parse
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from grpc import aio

from meshkit.gateway.calls import LOOPBACK_PEER, LOOPBACK_SECRET
from meshkit.gateway.transcoder import grpc_timeout

if TYPE_CHECKING:
    from meshkit.gateway.http import HttpEdge

GRPC_WEB = "application/grpc-web"
GRPC_WEB_TEXT = "application/grpc-web-text"
TRAILER_FLAG = 0x80
_NOT_METADATA = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "grpc-timeout",
        "host",
        "origin",
        "pragma",
        "referer",
        "te",
        "user-agent",
        "x-grpc-web",
        "x-user-agent",
        "x-forwarded-for",
    }
)


def is_grpc_web(content_type: str) -> bool:
    return content_type.startswith(GRPC_WEB)


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def unframe(body: bytes) -> list[bytes]:
    """The messages of a gRPC-Web body; ValueError when it is not whole frames."""
    messages, position = [], 0
    while position < len(body):
        if len(body) - position < 5:
            raise ValueError("a frame header is cut short")
        flags, length = struct.unpack_from(">BI", body, position)
        position += 5
        if position + length > len(body):
            raise ValueError("a frame is shorter than its length says")
        if flags & 0x01:
            raise ValueError("compressed frames are not accepted")
        if not flags & TRAILER_FLAG:
            messages.append(body[position : position + length])
        position += length
    return messages


def decode_text(body: bytes) -> bytes:
    """grpc-web-text: base64, possibly several padded chunks one after the other."""
    compact = b"".join(body.split())
    out, start = [], 0
    for index in range(0, len(compact), 4):
        quad = compact[index : index + 4]
        if quad.endswith(b"=") or index + 4 >= len(compact):
            out.append(base64.b64decode(compact[start : index + 4], validate=True))
            start = index + 4
    return b"".join(out)


def trailer_frame(code: grpc.StatusCode, message: str, trailers: Any) -> bytes:
    lines = [f"grpc-status: {code.value[0]}", f"grpc-message: {urllib.parse.quote(message)}"]
    for key, value in trailers or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        lines.append(f"{key}: {value}")
    return frame(("\r\n".join(lines) + "\r\n").encode(), TRAILER_FLAG)


class GrpcWeb:
    """Serves gRPC-Web requests by forwarding them over the edge's loopback channel."""

    def __init__(self, edge: HttpEdge) -> None:
        self._edge = edge

    async def handle(self, request: web.Request) -> web.StreamResponse:
        text = request.content_type.startswith(GRPC_WEB_TEXT)
        kind = f"{GRPC_WEB_TEXT if text else GRPC_WEB}+proto"
        if request.method != "POST":
            return self._trailers_only(kind, grpc.StatusCode.UNIMPLEMENTED, "gRPC-Web is POST")
        body = await request.read()
        try:
            messages = unframe(decode_text(body) if text else body)
        except (ValueError, binascii.Error) as error:
            return self._trailers_only(kind, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if len(messages) != 1:
            return self._trailers_only(
                kind,
                grpc.StatusCode.UNIMPLEMENTED,
                f"gRPC-Web carries one request message, got {len(messages)}",
            )
        metadata = [
            (key.lower(), value)
            for key, value in request.headers.items()
            if key.lower() not in _NOT_METADATA and not key.lower().startswith(("sec-", ":"))
        ]
        if request.remote:
            metadata.append((LOOPBACK_PEER, f"{LOOPBACK_SECRET} {request.remote}"))
        timeout = grpc_timeout(request.headers.get("grpc-timeout"))
        # unary_stream carries a unary call as well as a server stream on the wire
        call = self._edge.channel().unary_stream(
            request.path, request_serializer=None, response_deserializer=None
        )(messages[0], metadata=tuple(metadata), timeout=timeout)
        response = web.StreamResponse(headers={"Content-Type": kind})
        started = False

        async def send(chunk: bytes) -> None:
            await response.write(base64.b64encode(chunk) if text else chunk)

        try:
            async for answer in call:
                if not started:
                    await self._start(request, response, call)
                    started = True
                await send(frame(answer))
            code, details = grpc.StatusCode.OK, ""
            trailers: Any = await call.trailing_metadata()
        except aio.AioRpcError as error:
            code, details, trailers = error.code(), error.details() or "", error.trailing_metadata()
        finally:
            call.cancel()
        if not started:
            await self._start(request, response, call)
        await send(trailer_frame(code, details, trailers))
        await response.write_eof()
        return response

    async def _start(self, request: web.Request, response: web.StreamResponse, call: Any) -> None:
        initial: Any = ()
        try:
            initial = await call.initial_metadata()
        except aio.AioRpcError:
            pass
        for key, value in initial or ():
            if not isinstance(value, bytes):
                response.headers[key] = str(value)
        self._edge._cors(request, response)
        await response.prepare(request)

    def _trailers_only(self, kind: str, code: grpc.StatusCode, message: str) -> web.Response:
        return web.Response(
            status=200,
            headers={
                "Content-Type": kind,
                "grpc-status": str(code.value[0]),
                "grpc-message": urllib.parse.quote(message),
            },
        )
