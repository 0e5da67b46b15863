"""The gateway's HTTP port: HTTP/JSON (transcoder.py), gRPC-Web (grpcweb.py) and static files.

Both protocols are turned into gRPC calls on the gateway's own gRPC port, over one loopback
channel, the way grpc-gateway's proxy works: so authentication, rate limiting, the access log,
metrics, tracing and routing are the gRPC path's, once, for every protocol. The HTTP layer
passes on what a gRPC client would have sent: `authorization`, `x-request-id`, the trace
context, `grpc-timeout`, and `Grpc-Metadata-<key>` headers as metadata `<key>` (grpc-gateway's
convention), and the client's address, with a per-process secret that only this process knows
(calls.py), so that rate limits count the HTTP client and not the loopback.

aiohttp serves it (already a dependency, under py-consul's asyncio client).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc import aio

from meshkit.gateway.calls import LOOPBACK_PEER, LOOPBACK_SECRET, REQUEST_ID
from meshkit.gateway.descriptors import MeshDescriptors
from meshkit.gateway.grpcweb import GrpcWeb, is_grpc_web
from meshkit.gateway.routes import RouteTable
from meshkit.gateway.transcoder import (
    BadRequest,
    HttpRoute,
    Match,
    error_body,
    find_route,
    grpc_timeout,
    http_routes,
    http_status,
    metadata_dict,
    request_message,
    response_json,
)

log = logging.getLogger(__name__)
JSON = "application/json"

FORWARDED_HEADERS = ("authorization", REQUEST_ID, "traceparent", "tracestate", "baggage")
METADATA_PREFIX = "grpc-metadata-"


def outbound_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata an HTTP request carries on (see the module docstring)."""
    metadata: list[tuple[str, str]] = []
    for key, value in request.headers.items():
        name = key.lower()
        if name in FORWARDED_HEADERS:
            metadata.append((name, value))
        elif name.startswith(METADATA_PREFIX) and not name.endswith("-bin"):
            metadata.append((name[len(METADATA_PREFIX) :], value))
        elif name == "x-forwarded-for":
            metadata.append((name, value))
    if request.remote:
        metadata.append((LOOPBACK_PEER, f"{LOOPBACK_SECRET} {request.remote}"))
    return tuple(metadata)


def error_response(
    code: grpc.StatusCode,
    message: str,
    trailers: Any = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error as grpc-gateway writes it, with the headers HTTP clients look for."""
    found = metadata_dict(trailers)
    details = found.get("grpc-status-details-bin")
    out = dict(headers or {})
    if REQUEST_ID in found:
        out["X-Request-Id"] = str(found[REQUEST_ID])
    if code == grpc.StatusCode.UNAUTHENTICATED:
        out["WWW-Authenticate"] = str(found.get("www-authenticate") or "Bearer")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        for trailer, header in (
            ("retry-after", "Retry-After"),
            ("ratelimit-policy", "RateLimit-Policy"),
            ("ratelimit", "RateLimit"),
        ):
            if trailer in found:
                out[header] = str(found[trailer])
    return web.Response(
        status=status or http_status(code),
        body=error_body(code, message, details if isinstance(details, bytes) else None),
        content_type=JSON,
        headers=out,
    )


def _response_headers(metadata: Any) -> dict[str, str]:
    headers = {}
    for key, value in metadata_dict(metadata).items():
        if isinstance(value, bytes):
            continue
        headers["X-Request-Id" if key == REQUEST_ID else f"Grpc-Metadata-{key}"] = str(value)
    return headers


class HttpEdge:
    """The aiohttp server of the gateway's HTTP port."""

    def __init__(
        self,
        descriptors: MeshDescriptors,
        table: Callable[[], RouteTable],
        grpc_target: Callable[[], str],
        *,
        cors_origins: Sequence[str] = (),
        static_dir: Path | None = None,
        max_body: int = 1 << 20,
        on_decode: Callable[[], None] | None = None,
    ) -> None:
        """`on_decode` is told of every message this port parses or writes as JSON (the
        gateway's metrics count them)."""
        self._descriptors = descriptors
        self._table = table
        self._grpc_target = grpc_target
        self._static_dir = static_dir
        self._max_body = max_body
        self._decoded = on_decode or (lambda: None)
        self._channel: aio.Channel | None = None
        self._routes: list[HttpRoute] = []
        self._routes_key: tuple[int, frozenset[str]] | None = None
        self._runner: web.AppRunner | None = None
        self.cors_origins = frozenset(cors_origins)
        self.grpc_web = GrpcWeb(self)
        self.port = 0

    # -- serving ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0: any free port); the bound port."""
        app = web.Application(client_max_size=self._max_body)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)

    def channel(self) -> aio.Channel:
        """The loopback channel to the gateway's gRPC port (made on first use)."""
        if self._channel is None:
            self._channel = aio.insecure_channel(self._grpc_target())
        return self._channel

    def routes(self) -> list[HttpRoute]:
        """The HTTP routes of the routed services, rebuilt when routes or descriptors change."""
        pool, table = self._descriptors.pool, self._table()
        key = (id(pool), frozenset(table.routes))
        if key != self._routes_key:
            self._routes = http_routes(pool, table.routes)
            self._routes_key = key
        return self._routes

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._dispatch(request)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request body over the limit of {self._max_body} bytes",
                status=413,
            )
        except BadRequest as error:
            response = error_response(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        self._cors(request, response)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            return web.Response(status=204)
        if is_grpc_web(request.content_type):
            return await self.grpc_web.handle(request)
        match, allowed = find_route(self.routes(), request.method, request.path)
        if match is not None:
            return await self._transcode(request, match)
        if allowed:
            return error_response(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{request.method} {request.path}: this path takes {', '.join(allowed)}",
                status=405,
                headers={"Allow": ", ".join(allowed)},
            )
        static = self._static(request)
        if static is not None:
            return static
        return error_response(
            grpc.StatusCode.NOT_FOUND,
            f"no route for {request.method} {request.path}",
            status=404,
        )

    def _static(self, request: web.Request) -> web.StreamResponse | None:
        if self._static_dir is None or request.method not in ("GET", "HEAD"):
            return None
        name = request.path.lstrip("/") or "index.html"
        root = self._static_dir.resolve()
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            return None
        return web.FileResponse(path)

    # -- HTTP/JSON ------------------------------------------------------------------------------

    async def _transcode(self, request: web.Request, match: Match) -> web.StreamResponse:
        route = match.route
        body = None
        if route.body:
            if request.can_read_body and request.content_type not in (JSON, "text/plain", ""):
                return error_response(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"content type {request.content_type!r}: send {JSON}",
                    status=415,
                )
            body = await request.read()
        message = request_message(match, request.query.items(), body)
        self._decoded()
        metadata = outbound_metadata(request)
        timeout = grpc_timeout(request.headers.get("grpc-timeout"))
        payload = message.SerializeToString()
        channel = self.channel()
        if route.server_streaming:
            return await self._stream(request, route, payload, metadata, timeout)
        call = channel.unary_unary(
            route.grpc_method, request_serializer=None, response_deserializer=None
        )(payload, metadata=metadata, timeout=timeout)
        try:
            answer: bytes = await call
            headers = _response_headers(
                (*(await call.initial_metadata()), *(await call.trailing_metadata()))
            )
        except aio.AioRpcError as error:
            return error_response(error.code(), error.details() or "", error.trailing_metadata())
        self._decoded()
        document = response_json(route.response_class().FromString(answer))
        return web.Response(body=json.dumps(document).encode(), content_type=JSON, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        route: HttpRoute,
        payload: bytes,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> web.StreamResponse:
        """A server stream as newline-delimited JSON: `{"result": ...}` per message, and
        `{"error": {...}}` last if it fails after the first (grpc-gateway's framing)."""
        call = self.channel().unary_stream(
            route.grpc_method, request_serializer=None, response_deserializer=None
        )(payload, metadata=metadata, timeout=timeout)
        response_class = route.response_class()
        response: web.StreamResponse | None = None
        try:
            async for answer in call:
                if response is None:
                    response = web.StreamResponse(
                        headers={
                            "Content-Type": "application/x-ndjson",
                            **_response_headers(await call.initial_metadata()),
                        }
                    )
                    self._cors(request, response)
                    await response.prepare(request)
                self._decoded()
                line = {"result": response_json(response_class.FromString(answer))}
                await response.write(json.dumps(line).encode() + b"\n")
        except aio.AioRpcError as error:
            if response is None:
                return error_response(
                    error.code(), error.details() or "", error.trailing_metadata()
                )
            failed = {"error": {"code": error.code().value[0], "message": error.details() or ""}}
            await response.write(json.dumps(failed).encode() + b"\n")
        finally:
            call.cancel()  # a client gone away (cancelled, reset), or an error
        if response is None:  # a stream that ended with no message
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
        await response.write_eof()
        return response

    # -- CORS -----------------------------------------------------------------------------------

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """Envoy's cors filter's answers, for the configured origins only."""
        origin = request.headers.get("Origin")
        if not origin or origin not in self.cors_origins or response.prepared:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = (
            "grpc-status, grpc-message, x-request-id, retry-after, ratelimit, ratelimit-policy"
        )
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE"
            response.headers["Access-Control-Allow-Headers"] = (
                "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, x-request-id"
            )
            response.headers["Access-Control-Max-Age"] = "600"
