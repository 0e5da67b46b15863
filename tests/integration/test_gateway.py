"""The gateway as a client outside the mesh uses it: a real `python -m services.gateway`
process in front of the real platform, on a real Consul agent, called with real grpcurl and
plain grpc channels that know nothing of the mesh.

One platform and gateway serve the whole module; a test that needs a service to come and go
starts its own (an in-process MeshServer of a `test.gateway.v1.Shapes` service, with all four
call shapes) and stops it itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from playwright.async_api import async_playwright

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.server import MeshServer, ServerConfig
from mesh.telemetry.receiver import SpanRecord, TraceReceiver
from scripts.processes import free_tcp_port, wait_until
from scripts.redis_server import RedisServer
from tests.integration.conftest import PROJECT_ROOT, ServiceProcess, Stack, stack_under
from tests.integration.platform import scrape, value
from tests.integration.test_grpcurl import grpcurl

PLATFORM_SERVICES = [
    "foodmesh.catalog.v1.CatalogService",
    "foodmesh.delivery.v1.DeliveryService",
    "foodmesh.notifications.v1.NotificationService",
    "foodmesh.orderhistory.v1.OrderHistoryService",
    "foodmesh.orders.v1.OrderService",
    "foodmesh.payments.v1.PaymentService",
    "foodmesh.users.v1.UserService",
]
OWN_SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
SHAPES = "test.gateway.v1.Shapes"
ISSUER, AUDIENCE = "foodmesh-users", "foodmesh"
PASSWORD = "correct horse battery"
JSON = "application/json"
SHOP_ORIGIN = "http://shop.test"


@dataclass
class Edge:
    stack: Stack
    gateway: ServiceProcess
    http_port: int = 0

    @property
    def address(self) -> str:
        return self.gateway.address

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def listed(self) -> list[str]:
        answer = grpcurl(self.address, "list")
        assert answer.returncode == 0, answer.stderr
        return answer.stdout.split()

    def signed(self, **claims: Any) -> str:
        """A token signed with users' own newest key (read from its file), with these
        claims over valid ones: how to make the expired and wrong-audience tokens Login
        never hands out."""
        with sqlite3.connect(self.stack.data_dir / "users.db") as db:
            kid, pem = db.execute(
                "SELECT kid, private_key_pem FROM signing_keys ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
        now = int(time.time())
        base = {"sub": "someone", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
        return jwt.encode({**base, **claims}, pem, algorithm="ES256", headers={"kid": kid})


def started_gateway(stack: Stack, *flags: str, env: dict[str, str] | None = None) -> Edge:
    """A gateway process with an HTTP port, once it passes in Consul (with the gateways
    already running) and routes every platform service."""
    http_port = free_tcp_port()
    gateway = stack.start("gateway", "--http-port", str(http_port), *flags, env=env)
    running = {p.port for p in stack.processes if p.name == "gateway" and not p.stopped}
    stack.wait_passing("gateway", running)
    started = Edge(stack, gateway, http_port)
    wait_until(
        lambda: set(PLATFORM_SERVICES) <= set(started.listed()),
        timeout=30,
        message=f"the routes of the gateway on {gateway.port}",
    )
    return started


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    root = tmp_path_factory.mktemp("gateway")
    policy = root / "policy.toml"  # the platform's, with a shop's origin allowed (CORS)
    shipped = (PROJECT_ROOT / "services/gateway/policy.toml").read_text()
    policy.write_text(f'{shipped}\n[http]\ncors_origins = ["{SHOP_ORIGIN}"]\n')
    with stack_under(root) as stack:
        stack.start_platform()
        for read_model in ("notifications", "order-history"):  # no NATS: empty, but served
            stack.wait_passing(read_model, {stack.start(read_model).port})
        yield started_gateway(stack, "--gateway-policy", str(policy))


@asynccontextmanager
async def channel_to(edge: Edge) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(edge.address) as channel:
        yield channel


async def signed_up(edge: Edge, email: str) -> tuple[str, str]:
    """A new user, signed up and logged in through the gateway: (user_id, access token)."""
    async with channel_to(edge) as channel:
        users = users_pb2_grpc.UserServiceStub(channel)
        user = await users.CreateUser(
            users_pb2.CreateUserRequest(email=email, display_name="T", password=PASSWORD),
            timeout=10,
        )
        login = await users.Login(users_pb2.LoginRequest(email=email, password=PASSWORD))
    return user.user_id, login.access_token


async def placed_through(edge: Edge, token: str, address: str) -> orders_pb2.Order:
    """A margherita ordered through the gateway with `token`, paid by Visa."""
    async with channel_to(edge) as channel:
        order: orders_pb2.Order = await orders_pb2_grpc.OrderServiceStub(channel).PlaceOrder(
            orders_pb2.PlaceOrderRequest(
                lines=[orders_pb2.OrderLine(item_id="roma-margherita", quantity=1)],
                payment_method="pm_card_visa",
                delivery_address=address,
            ),
            metadata=bearer(token),
            timeout=30,
        )
    return order


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- routing and reflection ---------------------------------------------------------------


def test_list_shows_every_service_of_the_mesh_and_the_gateways_own(edge: Edge) -> None:
    assert edge.listed() == sorted([*PLATFORM_SERVICES, *OWN_SERVICES])
    methods = grpcurl(edge.address, "list", "foodmesh.orders.v1.OrderService")
    assert methods.stdout.split() == [
        "foodmesh.orders.v1.OrderService.CancelOrder",
        "foodmesh.orders.v1.OrderService.GetOrder",
        "foodmesh.orders.v1.OrderService.PlaceOrder",
        "foodmesh.orders.v1.OrderService.WatchOrder",
    ]


def test_describe_works_for_services_methods_and_messages(edge: Edge) -> None:
    service = grpcurl(edge.address, "describe", "foodmesh.payments.v1.PaymentService")
    assert service.returncode == 0, service.stderr
    assert "rpc AuthorizePayment" in service.stdout
    method = grpcurl(edge.address, "describe", "foodmesh.orders.v1.OrderService.WatchOrder")
    assert method.returncode == 0, method.stderr
    assert "returns ( stream .foodmesh.orders.v1.Order )" in method.stdout
    message = grpcurl(edge.address, "describe", "foodmesh.orders.v1.PlaceOrderRequest")
    assert message.returncode == 0, message.stderr
    assert "string idempotency_key" in message.stdout


def test_grpcurl_calls_through_the_gateway_without_proto_files(edge: Edge) -> None:
    request = json.dumps({"item_id": "roma-margherita"})
    answer = grpcurl(
        "-v", "-d", request, edge.address, "foodmesh.catalog.v1.CatalogService/GetItem"
    )
    assert answer.returncode == 0, answer.stderr
    assert '"name": "Margherita"' in answer.stdout
    trailers = answer.stdout.split("Response trailers received:")[1]
    assert "x-request-id: " in trailers  # made, since the client sent none
    kept = grpcurl(
        "-v",
        "-H",
        "x-request-id: from-the-client",
        "-d",
        request,
        edge.address,
        "foodmesh.catalog.v1.CatalogService/GetItem",
    )
    assert "x-request-id: from-the-client" in kept.stdout


async def test_an_unknown_service_is_unimplemented_naming_it(edge: Edge) -> None:
    async with channel_to(edge) as channel:
        call = channel.unary_unary("/nothere.v1.Nothing/Get")(b"", timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "nothere.v1.Nothing" in (refused.value.details() or "")


# -- authentication -----------------------------------------------------------------------


async def test_every_kind_of_bad_token_is_unauthenticated_saying_which(edge: Edge) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    real = edge.signed()
    kid = jwt.get_unverified_header(real)["kid"]
    now = int(time.time())
    claims = {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    cases: dict[str, tuple[tuple[str, str], ...]] = {
        "missing token": (),
        "malformed token": (("authorization", "Bearer not-a-jwt"),),
        "malformed token: the authorization header is not": (("authorization", "Basic eDp5"),),
        "malformed token: more than one": (
            ("authorization", f"Bearer {real}"),
            ("authorization", f"Bearer {real}"),
        ),
        "expired token": bearer(edge.signed(iat=now - 7200, exp=now - 3600)),
        "not yet valid token": bearer(edge.signed(nbf=now + 3600)),
        "forged token": bearer(jwt.encode(claims, stranger, "ES256", headers={"kid": kid})),
        "unknown key token": bearer(jwt.encode(claims, stranger, "ES256", headers={"kid": "k9"})),
        "wrong issuer token": bearer(edge.signed(iss="someone-else")),
        "wrong audience token": bearer(edge.signed(aud="another-app")),
    }
    async with channel_to(edge) as channel:
        orders = orders_pb2_grpc.OrderServiceStub(channel)
        for says, metadata in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await orders.GetOrder(
                    orders_pb2.GetOrderRequest(order_id="o-1"), metadata=metadata, timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, says
            assert (refused.value.details() or "").startswith(says), refused.value.details()
        get_order = "/foodmesh.orders.v1.OrderService/GetOrder"
        samples = scrape(edge.stack, "gateway", edge.gateway.port)
        for outcome in ("missing", "malformed", "expired", "forged", "wrong_audience"):
            counted = value(
                samples, "foodmesh_gateway_auth_total", method=get_order, outcome=outcome
            )
            assert counted >= 1, outcome
        assert f"{get_order} rid=" in edge.gateway.log()
        assert "code=UNAUTHENTICATED" in edge.gateway.log()
        assert "auth=not_yet_valid" in edge.gateway.log()
        # The catalog's reads are public; a valid token on them is fine too.
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        for metadata in ((), bearer(real)):
            item = await catalog.GetItem(
                catalog_pb2.GetItemRequest(item_id="roma-margherita"), metadata=metadata
            )
            assert item.name == "Margherita"


async def test_the_token_decides_whose_orders_a_caller_sees(edge: Edge) -> None:
    ada, ada_token = await signed_up(edge, "ada@gateway.example")
    grace, grace_token = await signed_up(edge, "grace@gateway.example")
    line = orders_pb2.OrderLine(item_id="roma-margherita", quantity=1)
    request = orders_pb2.PlaceOrderRequest(
        lines=[line], payment_method="pm_card_visa", delivery_address="1 Edge Road"
    )
    async with channel_to(edge) as channel:
        orders = orders_pb2_grpc.OrderServiceStub(channel)
        # A client's own x-user-id never reaches orders: the token's subject does.
        placed = await orders.PlaceOrder(
            request, metadata=(*bearer(ada_token), ("x-user-id", grace)), timeout=30
        )
        assert placed.customer_id == ada
        assert placed.status == orders_pb2.ORDER_STATUS_CONFIRMED
        refused = await _error(
            orders.PlaceOrder(
                orders_pb2.PlaceOrderRequest(
                    customer_id=ada,
                    lines=[line],
                    payment_method="pm_card_visa",
                    delivery_address="1 Edge Road",
                ),
                metadata=bearer(grace_token),
                timeout=30,
            )
        )
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        mine = orders_pb2.GetOrderRequest(order_id=placed.order_id)
        seen = await orders.GetOrder(mine, metadata=bearer(ada_token))
        assert seen.order_id == placed.order_id
        hidden = await _error(orders.GetOrder(mine, metadata=bearer(grace_token)))
        assert hidden.code() == grpc.StatusCode.NOT_FOUND
        # A server stream through the gateway: the first update, then the client leaves.
        watch = orders.WatchOrder(
            orders_pb2.WatchOrderRequest(order_id=placed.order_id),
            metadata=bearer(ada_token),
            timeout=30,
        )
        first = await watch.read()
        assert first.order_id == placed.order_id
        watch.cancel()


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


# -- a service that comes and goes, with every call shape ----------------------------------


def _shapes_descriptor() -> Any:
    """`test.gateway.v1.Shapes` (StringValue in and out, one method per call shape), added to
    the default pool so that the server's reflection serves it like any generated file."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(SHAPES)
    except KeyError:
        pass
    wrappers = wrappers_pb2.DESCRIPTOR.name
    file = descriptor_pb2.FileDescriptorProto(
        name="test/gateway/v1/shapes.proto",
        package="test.gateway.v1",
        dependency=[wrappers],
        syntax="proto3",
    )
    service = file.service.add(name="Shapes")
    for name, client_streaming, server_streaming in (
        ("Echo", False, False),
        ("Expand", False, True),
        ("Join", True, False),
        ("Chat", True, True),
    ):
        service.method.add(
            name=name,
            input_type=".google.protobuf.StringValue",
            output_type=".google.protobuf.StringValue",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    pool.AddSerializedFile(file.SerializeToString())
    return pool.FindServiceByName(SHAPES)


def _shapes_handler() -> grpc.GenericRpcHandler:
    text = wrappers_pb2.StringValue

    async def echo(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """What the call arrived with: its metadata and its time left."""
        seen = {key: str(value) for key, value in context.invocation_metadata() or ()}
        left = context.time_remaining()
        return text(value=json.dumps({"metadata": seen, "time_remaining": left}))

    async def expand(request: Any, context: Any) -> AsyncIterator[Any]:
        for letter in request.value:
            yield text(value=letter)

    async def join(requests: Any, context: Any) -> Any:
        return text(value="".join([r.value async for r in requests]))

    async def chat(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield text(value=request.value.upper())

    kinds = {
        "Echo": grpc.unary_unary_rpc_method_handler,
        "Expand": grpc.unary_stream_rpc_method_handler,
        "Join": grpc.stream_unary_rpc_method_handler,
        "Chat": grpc.stream_stream_rpc_method_handler,
    }
    behaviors = {"Echo": echo, "Expand": expand, "Join": join, "Chat": chat}
    return grpc.method_handlers_generic_handler(
        SHAPES,
        {
            name: kind(
                behaviors[name],
                request_deserializer=text.FromString,
                response_serializer=text.SerializeToString,
            )
            for name, kind in kinds.items()
        },
    )


@asynccontextmanager
async def shapes_service(edge: Edge) -> AsyncIterator[MeshServer]:
    config = ServerConfig("shapes", check_interval=1.0, drain_delay=0.0, grace_period=1.0)
    server = MeshServer(config, consul=edge.stack.settings)
    handler = _shapes_handler()
    server.add_service(
        _shapes_descriptor(), lambda _, s: s.add_generic_rpc_handlers((handler,)), None
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _poll(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.1)


async def test_a_service_that_registers_is_routed_in_all_four_shapes_until_it_leaves(
    edge: Edge,
) -> None:
    user, token = await signed_up(edge, "shapes@gateway.example")
    text = wrappers_pb2.StringValue
    async with channel_to(edge) as channel:

        def method(name: str, shape: str) -> Any:
            return getattr(channel, shape)(
                f"/{SHAPES}/{name}",
                request_serializer=text.SerializeToString,
                response_deserializer=text.FromString,
            )

        echo = method("Echo", "unary_unary")

        async def echo_code() -> grpc.StatusCode:
            try:
                await echo(text(value="?"), metadata=bearer(token), timeout=5)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        assert await echo_code() == grpc.StatusCode.UNIMPLEMENTED
        async with shapes_service(edge) as server:
            await _poll(lambda: _is(echo_code(), grpc.StatusCode.OK), "the gateway routes Shapes")
            assert SHAPES in await asyncio.to_thread(edge.listed)
            # Its descriptors follow (fetched from its reflection once it passes its check).
            chat_shape = "( stream .google.protobuf.StringValue ) returns ( stream"
            await _poll(
                lambda: _described(edge, f"{SHAPES}.Chat", chat_shape),
                "describe Shapes.Chat through the gateway",
            )

            # Metadata and the deadline pass through; what the gateway owns does not.
            answer = await echo(
                text(value="hi"),
                metadata=(*bearer(token), ("x-custom", "kept"), ("x-user-id", "spoofed")),
                timeout=7,
            )
            seen = json.loads(answer.value)
            assert seen["metadata"]["x-custom"] == "kept"
            assert seen["metadata"]["x-user-id"] == user
            assert "authorization" not in seen["metadata"]
            assert seen["metadata"]["x-request-id"]
            assert 5 < seen["time_remaining"] < 7.1  # grpc-timeout rounds up a little

            expanded = method("Expand", "unary_stream")(
                text(value="abc"), metadata=bearer(token), timeout=10
            )
            assert [r.value async for r in expanded] == ["a", "b", "c"]
            joined = await method("Join", "stream_unary")(
                iter([text(value="x"), text(value="y")]), metadata=bearer(token), timeout=10
            )
            assert joined.value == "xy"
            chat = method("Chat", "stream_stream")(metadata=bearer(token), timeout=10)
            for word in ("one", "two"):
                await chat.write(text(value=word))
                assert (await chat.read()).value == word.upper()
            await chat.done_writing()

            # Registered but not healthy: UNAVAILABLE, naming the service.
            await server._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await _poll(
                lambda: _is(asyncio.to_thread(edge.stack.passing_ports, "shapes"), set()),
                "Consul sees shapes critical",
            )
            with pytest.raises(grpc.aio.AioRpcError) as unavailable:
                await _until_code(echo, token, grpc.StatusCode.UNAVAILABLE)
            assert SHAPES in (unavailable.value.details() or "")
        # Deregistered: the route goes.
        await _poll(lambda: _is(echo_code(), grpc.StatusCode.UNIMPLEMENTED), "the route to go away")
        assert SHAPES not in await asyncio.to_thread(edge.listed)


async def _described(edge: Edge, symbol: str, text: str) -> bool:
    """Whether grpcurl's describe of `symbol` through the gateway shows `text` (run off the
    loop, which serves the Shapes service the gateway asks)."""
    answer = await asyncio.to_thread(grpcurl, edge.address, "describe", symbol)
    return text in answer.stdout


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _until_code(echo: Any, token: str, code: grpc.StatusCode) -> None:
    """Call until the call fails with `code` (re-raised), within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            await echo(wrappers_pb2.StringValue(value="?"), metadata=bearer(token), timeout=5)
        except grpc.aio.AioRpcError as error:
            if error.code() == code:
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {code.name} within 30 s")


# -- rate limiting --------------------------------------------------------------------------


async def test_over_the_limit_is_resource_exhausted_with_retry_info_per_consumer(
    edge: Edge,
) -> None:
    limited = await asyncio.to_thread(
        started_gateway, edge.stack, "--rate-limit", "1/min", "--rate-burst", "3"
    )
    try:
        _, token = await signed_up(edge, "limited@gateway.example")
        request = catalog_pb2.GetItemRequest(item_id="roma-margherita")
        async with channel_to(limited) as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            for _ in range(3):
                await catalog.GetItem(request, timeout=10)
            call = catalog.GetItem(request, timeout=10)
            refused = await _error(call)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "GetItem" in (refused.details() or "")
            status = rpc_status.from_call(refused)
            assert status is not None
            [detail] = status.details
            info = error_details_pb2.RetryInfo()
            assert detail.Unpack(info)
            assert 59 < info.retry_delay.ToTimedelta().total_seconds() <= 60  # one call a minute
            trailers = dict(refused.trailing_metadata() or ())
            assert int(trailers["retry-after"]) == 60
            # The limit is per consumer: a signed-in user is another consumer.
            item = await catalog.GetItem(request, metadata=bearer(token), timeout=10)
            assert item.name == "Margherita"
        # Over HTTP: 429 with Retry-After and the IETF RateLimit headers; the HTTP client
        # (this one address) is the consumer, as over gRPC.
        async with http_client() as http:
            async with http.get(f"{limited.http}/v1/items/roma-margherita") as answer:
                assert answer.status == 429, await answer.text()
                assert answer.headers["Retry-After"] == "60"
                assert answer.headers["RateLimit-Policy"] == '"gateway";q=3;w=180'
                assert answer.headers["RateLimit"].startswith('"gateway";r=0;t=')
                body = await answer.json()
        assert body["code"] == 8
        assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    finally:
        limited.gateway.stop()


async def test_two_replicas_sharing_redis_hold_the_combined_rate_and_fail_open_without_it(
    edge: Edge, tmp_path: Path
) -> None:
    redis = RedisServer(log_path=tmp_path / "redis.log")
    redis.start()
    flags = ("--rate-limit", "1/min", "--rate-burst", "4", "--rate-limit-store", redis.url)
    replicas = [await asyncio.to_thread(started_gateway, edge.stack, *flags) for _ in range(2)]
    try:
        request = catalog_pb2.GetItemRequest(item_id="roma-margherita")
        async with (
            channel_to(replicas[0]) as one,
            channel_to(replicas[1]) as two,
        ):
            stubs = [catalog_pb2_grpc.CatalogServiceStub(c) for c in (one, two)]
            codes = []
            for n in range(8):  # alternating between the replicas
                try:
                    await stubs[n % 2].GetItem(request, timeout=10)
                    codes.append("OK")
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code().name)
            # One budget of 4 for the pair, not 4 each.
            assert codes == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 4

            redis.stop()
            for stub in stubs:  # Redis gone: both let calls through
                assert (await stub.GetItem(request, timeout=10)).name == "Margherita"
        for replica in replicas:
            log = replica.gateway.log()
            assert "rate-limit store" in log and "unreachable" in log
            samples = scrape(edge.stack, "gateway", replica.gateway.port)
            assert value(samples, "foodmesh_gateway_rate_limit_store_errors_total") >= 1
    finally:
        for replica in replicas:
            replica.gateway.stop()
        redis.stop()


# -- HTTP/JSON ------------------------------------------------------------------------------


@asynccontextmanager
async def http_client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_http_json_reads_the_menu_with_path_and_query_parameters(edge: Edge) -> None:
    async with http_client() as http:
        async with http.get(f"{edge.http}/v1/items/roma-margherita") as answer:
            assert answer.status == 200, await answer.text()
            item = await answer.json()
            assert answer.headers["X-Request-Id"]
        # lowerCamelCase out, int64 as a string (proto3 JSON)
        assert item["itemId"] == "roma-margherita" and item["priceCents"] == "850"
        listed: list[str] = []
        token = ""
        while True:  # both spellings in: restaurantId and page_size
            query = {"restaurantId": "trattoria-roma", "page_size": "2", "pageToken": token}
            async with http.get(f"{edge.http}/v1/items", params=query) as answer:
                assert answer.status == 200, await answer.text()
                page = await answer.json()
            assert len(page["items"]) <= 2
            listed += [i["itemId"] for i in page["items"]]
            token = page.get("nextPageToken", "")
            if not token:
                break
        assert "roma-margherita" in listed and len(listed) > 2


async def test_http_json_signs_up_logs_in_orders_watches_and_cancels(edge: Edge) -> None:
    email = "http@gateway.example"
    async with http_client() as http:
        body = {"email": email, "displayName": "Http", "password": PASSWORD}
        async with http.post(f"{edge.http}/v1/users", json=body) as answer:
            assert answer.status == 200, await answer.text()
            user = await answer.json()
        login = {"email": email, "password": PASSWORD}
        async with http.post(f"{edge.http}/v1/users:login", json=login) as answer:
            assert answer.status == 200, await answer.text()
            token = (await answer.json())["accessToken"]
        auth = {"Authorization": f"Bearer {token}"}
        order = {
            "lines": [{"item_id": "roma-margherita", "quantity": 1}],
            "paymentMethod": "pm_card_visa",
            "deliveryAddress": "2 Http Lane",
        }
        async with http.post(f"{edge.http}/v1/orders", json=order, headers=auth) as answer:
            assert answer.status == 200, await answer.text()
            placed = await answer.json()
        assert placed["customerId"] == user["userId"]
        assert placed["status"] == "ORDER_STATUS_CONFIRMED"
        order_url = f"{edge.http}/v1/orders/{placed['orderId']}"
        async with http.get(order_url, headers=auth) as answer:
            assert (await answer.json())["orderId"] == placed["orderId"]
        async with http.get(f"{order_url}:watch", headers=auth) as watching:
            assert watching.status == 200
            assert watching.headers["Content-Type"].startswith("application/x-ndjson")
            first = json.loads(await watching.content.readline())
            assert first["result"]["status"] == "ORDER_STATUS_CONFIRMED"
            async with http.post(f"{order_url}:cancel", json={}, headers=auth) as cancelled:
                assert cancelled.status == 200, await cancelled.text()
                assert (await cancelled.json())["status"] == "ORDER_STATUS_CANCELLED"
            last = json.loads(await watching.content.readline())
            assert last["result"]["status"] == "ORDER_STATUS_CANCELLED"
            assert await watching.content.readline() == b""  # final: the stream ends


async def test_http_errors_have_the_right_status_and_a_json_body(edge: Edge) -> None:
    async with http_client() as http:

        async def refused(method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
            async with http.request(method, f"{edge.http}{path}", **kwargs) as answer:
                return answer.status, answer.headers, await answer.json()

        status, headers, body = await refused("GET", "/v1/orders/o-1")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert body["code"] == 16 and body["message"].startswith("missing token")
        status, _, body = await refused("GET", "/v1/items/no-such-item")
        assert status == 404 and body["code"] == 5 and "item_id" in body["message"]
        _, token = await signed_up(edge, "errors@gateway.example")
        auth = {"Authorization": f"Bearer {token}"}
        status, _, body = await refused(
            "POST", "/v1/orders", data=b"{not json", headers={**auth, "Content-Type": JSON}
        )
        assert status == 400 and body["code"] == 3 and "JSON" in body["message"]
        status, _, body = await refused(
            "POST", "/v1/orders", json={"lines": [{"quantity": "many"}]}, headers=auth
        )
        assert status == 400 and body["code"] == 3 and "quantity" in body["message"]
        status, _, body = await refused(
            "POST", "/v1/orders", data=b"<order/>", headers={**auth, "Content-Type": "text/xml"}
        )
        assert status == 415 and "application/json" in body["message"]
        big = json.dumps({"deliveryAddress": "x" * (2 << 20)}).encode()
        status, _, body = await refused(
            "POST", "/v1/orders", data=big, headers={**auth, "Content-Type": JSON}
        )
        assert status == 413 and "limit" in body["message"]
        status, _, body = await refused("GET", "/v2/nothing")
        assert status == 404 and "no route for GET /v2/nothing" in body["message"]
        status, headers, body = await refused("DELETE", "/v1/items/roma-margherita")
        assert status == 405 and headers["Allow"] == "GET, PUT"
        status, _, body = await refused(
            "POST", "/v1/orders", json={"lines": []}, headers=auth
        )  # the service's own refusal, mapped
        assert status == 400 and "lines" in body["message"]


# -- gRPC-Web -------------------------------------------------------------------------------


def _grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """The messages and the trailers of a gRPC-Web response body."""
    messages, trailers, position = [], {}, 0
    while position < len(body):
        flags, length = struct.unpack_from(">BI", body, position)
        payload = body[position + 5 : position + 5 + length]
        position += 5 + length
        if flags & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


async def _grpc_web(
    edge: Edge, method: str, request: Any, *, text: bool = False, **headers: str
) -> tuple[int, Any, list[bytes], dict[str, str]]:
    payload = request.SerializeToString()
    body = struct.pack(">BI", 0, len(payload)) + payload
    kind = "application/grpc-web-text" if text else "application/grpc-web+proto"
    async with http_client() as http:
        async with http.post(
            f"{edge.http}/{method}",
            data=base64.b64encode(body) if text else body,
            headers={"Content-Type": kind, "X-Grpc-Web": "1", **headers},
        ) as answer:
            raw = await answer.read()
            status, answer_headers = answer.status, answer.headers
    messages, trailers = _grpc_web_frames(base64.b64decode(raw) if text else raw)
    return status, answer_headers, messages, trailers


async def test_grpc_web_unary_and_server_streaming_in_binary_and_text(edge: Edge) -> None:
    get_item = "foodmesh.catalog.v1.CatalogService/GetItem"
    request = catalog_pb2.GetItemRequest(item_id="roma-margherita")
    for text in (False, True):
        status, headers, messages, trailers = await _grpc_web(
            edge, get_item, request, text=text, Origin=SHOP_ORIGIN
        )
        assert status == 200 and trailers["grpc-status"] == "0", trailers
        assert catalog_pb2.Item.FromString(messages[0]).name == "Margherita"
        assert headers["Access-Control-Allow-Origin"] == SHOP_ORIGIN
        assert trailers["x-request-id"]  # a unary answer's request id is in its trailers

    status, _, messages, trailers = await _grpc_web(
        edge, "foodmesh.orders.v1.OrderService/GetOrder", orders_pb2.GetOrderRequest(order_id="o")
    )
    assert messages == [] and trailers["grpc-status"] == "16"  # no token
    assert "missing%20token" in trailers["grpc-message"]

    _, token = await signed_up(edge, "web@gateway.example")
    placed = await placed_through(edge, token, "3 Web Way")
    watch = orders_pb2.WatchOrderRequest(order_id=placed.order_id)
    status, _, messages, trailers = await _grpc_web(
        edge,
        "foodmesh.orders.v1.OrderService/WatchOrder",
        watch,
        authorization=f"Bearer {token}",
        **{"grpc-timeout": "2S"},
    )  # the order never becomes final in 2 s: the stream ends at the deadline
    assert [orders_pb2.Order.FromString(m).order_id for m in messages][:1] == [placed.order_id]
    assert trailers["grpc-status"] == "4", trailers


async def test_grpc_web_preflight_answers_configured_origins_only(edge: Edge) -> None:
    async with http_client() as http:
        for origin, allowed in ((SHOP_ORIGIN, True), ("http://evil.test", False)):
            async with http.options(
                f"{edge.http}/foodmesh.catalog.v1.CatalogService/GetItem",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type,x-grpc-web,authorization",
                },
            ) as answer:
                assert answer.status == 204
                got = answer.headers.get("Access-Control-Allow-Origin")
                assert (got == origin) if allowed else got is None
                if allowed:
                    assert "authorization" in answer.headers["Access-Control-Allow-Headers"]


# -- the storefront, in a real browser --------------------------------------------------------

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def test_the_storefront_signs_up_orders_and_shows_the_status_change_live(
    edge: Edge, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (scripts/bootstrap.sh installs it)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = await browser.new_page()
            await page.goto(f"{edge.http}/")
            await page.wait_for_selector('.item[data-item-id="roma-margherita"]')
            assert "Margherita" in await page.inner_text("#menu")

            signup = page.locator("#signup")
            await signup.locator("[name=display_name]").fill("Browser")
            await signup.locator("[name=email]").fill("browser@gateway.example")
            await signup.locator("[name=password]").fill(PASSWORD)
            await signup.locator("button").click()
            await page.wait_for_function(
                "document.getElementById('who').textContent.startsWith('Signed in as')"
            )

            await page.locator('.item[data-item-id="roma-margherita"] button').click()
            await page.locator("#place").click()
            status = page.locator("#order-status")
            await page.wait_for_function(
                "document.getElementById('order-status').textContent === 'CONFIRMED'"
            )
            order_id = await page.inner_text("#order-id")
            token = await page.evaluate("sessionStorage.getItem('token')")

            # Cancelled from elsewhere: the page's WatchOrder shows it without a reload.
            async with http_client() as http:
                async with http.post(
                    f"{edge.http}/v1/orders/{order_id}:cancel",
                    json={},
                    headers={"Authorization": f"Bearer {token}"},
                ) as answer:
                    assert answer.status == 200, await answer.text()
            await page.wait_for_function(
                "document.getElementById('order-status').textContent === 'CANCELLED'"
            )
            assert await status.inner_text() == "CANCELLED"
            steps = await page.locator("#order-history li").all_inner_texts()
            assert steps[0] == "CONFIRMED" and steps[-1].startswith("CANCELLED")
            await page.screenshot(path=str(tmp_path / "storefront.png"))
        finally:
            await browser.close()


# -- traces ---------------------------------------------------------------------------------


async def test_the_gateways_spans_continue_the_clients_trace_or_start_one(edge: Edge) -> None:
    receiver = TraceReceiver()
    await receiver.start()
    export = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    gateway = await asyncio.to_thread(started_gateway, edge.stack, env=export)
    try:
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        request = catalog_pb2.GetItemRequest(item_id="roma-margherita")
        async with channel_to(gateway) as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            continued = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
            await catalog.GetItem(request, metadata=continued, timeout=10)
            await catalog.GetItem(request, timeout=10)

        def both(spans: list[SpanRecord]) -> bool:
            servers = [s for s in spans if s.service_name == "gateway" and s.kind == "SERVER"]
            return len(servers) >= 2 and any(s.trace_id == trace_id for s in servers)

        spans = await receiver.wait_for(both, timeout=30)
        servers = [s for s in spans if s.service_name == "gateway" and s.kind == "SERVER"]
        (joined,) = [s for s in servers if s.trace_id == trace_id]
        assert joined.parent_span_id == parent_id  # the client's span is the parent
        (started,) = [s for s in servers if s.trace_id != trace_id]
        assert not started.parent_span_id  # no traceparent: the gateway starts the trace
        for server in (joined, started):
            attempts = [s for s in spans if s.trace_id == server.trace_id and s.kind == "CLIENT"]
            assert attempts, f"the forwarded call of {server.name} is in its trace"
    finally:
        gateway.gateway.stop()
        await receiver.stop()


async def test_every_other_mapped_http_route_answers_and_internal_methods_are_refused(
    edge: Edge,
) -> None:
    user_id, token = await signed_up(edge, "routes@gateway.example")
    auth = {"Authorization": f"Bearer {token}"}
    placed = await placed_through(edge, token, "4 Route Road")
    reads = {
        f"/v1/users/{user_id}": lambda body: body["userId"] == user_id,
        "/v1/jwks": lambda body: json.loads(body["jwksJson"])["keys"],
        f"/v1/payments?orderId={placed.order_id}": lambda body: (
            body["payments"][0]["paymentId"] == placed.payment_id
        ),
        f"/v1/payments/{placed.payment_id}": lambda body: (
            body["status"] == "PAYMENT_STATUS_CAPTURED"
        ),
        f"/v1/deliveries?orderId={placed.order_id}": lambda body: (
            body["deliveries"][0]["deliveryId"] == placed.delivery_id
        ),
        f"/v1/deliveries/{placed.delivery_id}": lambda body: body["orderId"] == placed.order_id,
        f"/v1/users/{user_id}/notifications": lambda body: body.get("notifications", []) == [],
        f"/v1/customers/{user_id}/orders": lambda body: body.get("orders", []) == [],
    }
    async with http_client() as http:
        for path, holds in reads.items():
            async with http.get(f"{edge.http}{path}", headers=auth) as answer:
                assert answer.status == 200, (path, await answer.text())
                assert holds(await answer.json()), path
        async with http.get(
            f"{edge.http}/v1/deliveries/{placed.delivery_id}:track",
            headers={**auth, "Grpc-Timeout": "1S"},
        ) as tracked:
            first = json.loads(await tracked.content.readline())
            assert first["result"]["deliveryId"] == placed.delivery_id
        # A write only the mesh (or an operator) makes is not served at the edge.
        async with http.put(
            f"{edge.http}/v1/items/roma-margherita",
            json={"itemId": "roma-margherita", "name": "Free pizza", "priceCents": "0"},
            headers=auth,
        ) as answer:
            assert answer.status == 403
            assert "internal to the mesh" in (await answer.json())["message"]
    async with channel_to(edge) as channel:
        payments = channel.unary_unary("/foodmesh.payments.v1.PaymentService/CapturePayment")
        refused = await _error(payments(b"", metadata=bearer(token), timeout=10))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "CapturePayment" in (refused.details() or "")
