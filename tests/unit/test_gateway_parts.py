"""The gateway's parts on their own: the route table from Consul answers, the catalog watch's
loop on scripted answers, the key set's refetch rule on a fake clock, bearer headers, method
patterns, the policy file, and the merged descriptor pool."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pb2, timestamp_pb2
from jwt.algorithms import ECAlgorithm

from foodmesh.orders.v1 import orders_pb2
from mesh.core.backoff import ExponentialBackoff
from mesh.policy import PolicyError
from mesh.server.reflection import enable_reflection
from mesh.testing import FakeClock
from meshkit.gateway.auth import MethodPatterns, bearer_token
from meshkit.gateway.descriptors import MeshDescriptors, build_pool
from meshkit.gateway.policy import load_gateway_policy, parse_gateway_policy
from meshkit.gateway.ratelimit import GcraLimiter, Limit, RateLimits, parse_rate
from meshkit.gateway.routes import CatalogWatch, Route, RouteTable
from meshkit.gateway.tokens import (
    EXPIRED,
    FORGED,
    MALFORMED,
    NO_KEYS,
    UNKNOWN_KEY,
    WRONG_AUDIENCE,
    InvalidToken,
    KeySet,
    TokenRules,
    TokenVerifier,
)
from meshkit.gateway.transcoder import (
    BadRequest,
    HttpRoute,
    PathTemplate,
    error_body,
    find_route,
    http_routes,
    http_status,
    request_message,
)


def instance(grpc_services: str, version: str = "1.0.0") -> dict[str, Any]:
    return {"ServiceMeta": {"grpc_services": grpc_services, "version": version}}


# -- the route table ----------------------------------------------------------------------


def test_routes_come_from_the_grpc_services_meta_of_every_instance() -> None:
    table = RouteTable.from_catalog(
        {
            "catalog": [instance("pkg.Catalog"), instance("pkg.Catalog", "1.1.0")],
            "orders": [instance("pkg.Orders,pkg.Admin")],
            "gateway": [instance("")],
            "consul": [{"ServiceMeta": {}}],
        }
    )
    assert table.routes == {
        "pkg.Catalog": Route("pkg.Catalog", "catalog", frozenset({"1.0.0", "1.1.0"}), 2),
        "pkg.Orders": Route("pkg.Orders", "orders", frozenset({"1.0.0"}), 1),
        "pkg.Admin": Route("pkg.Admin", "orders", frozenset({"1.0.0"}), 1),
    }
    assert table.consul_services() == {"catalog", "orders"}


def test_a_grpc_service_two_consul_services_claim_goes_to_the_bigger() -> None:
    table = RouteTable.from_catalog(
        {"old": [instance("pkg.S")], "new": [instance("pkg.S"), instance("pkg.S")]}
    )
    route = table.get("pkg.S")
    assert route is not None and route.consul_service == "new"


async def test_the_catalog_watch_follows_changes_and_keeps_its_table_through_failures() -> None:
    answers: list[Any] = [
        (5, {"catalog": []}),
        RuntimeError("Consul down"),
        (6, {"catalog": [], "orders": []}),
        (6, {"catalog": [], "orders": []}),  # the same: nothing new to tell
        (7, {"orders": []}),
    ]
    instances = {"catalog": [instance("pkg.Catalog")], "orders": [instance("pkg.Orders")]}
    asked: list[int] = []

    async def services(index: int, wait: float) -> tuple[int, Mapping[str, Any]]:
        asked.append(index)
        if not answers:
            await asyncio.Event().wait()  # a blocking query that never answers
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def catalog_service(name: str) -> list[Mapping[str, Any]]:
        return instances[name]

    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    watch = CatalogWatch(
        services, catalog_service, sleep=no_sleep, backoff=ExponentialBackoff(0.01, 0.01)
    )
    seen: list[set[str]] = []
    async for table in watch:
        seen.append(set(table.routes))
        if len(seen) == 3:
            break
    assert seen == [{"pkg.Catalog"}, {"pkg.Catalog", "pkg.Orders"}, {"pkg.Orders"}]
    assert asked == [0, 5, 5, 6, 6]  # the failed query is asked again with the same index


# -- tokens ---------------------------------------------------------------------------------


class Issuer:
    """An issuer with one ES256 key and its JWK Set."""

    def __init__(self, kid: str = "k1") -> None:
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return json.dumps({"keys": [{**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}]})

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        base = {"sub": "u1", "iss": "iss", "aud": "aud", "iat": now, "exp": now + 60}
        return jwt.encode({**base, **claims}, self.key, "ES256", headers={"kid": self.kid})


async def test_an_unknown_kid_refetches_the_keys_at_most_once_per_interval() -> None:
    clock = FakeClock()
    old, new = Issuer("k1"), Issuer("k2")
    published = [old.jwks()]

    async def fetch() -> str:
        return published[-1]

    keys = KeySet(fetch, min_refetch=5.0, clock=clock)
    verifier = TokenVerifier(keys, TokenRules("iss", "aud"))
    assert (await verifier.verify(old.token()))["sub"] == "u1"
    assert keys.fetches == 1
    published.append(new.jwks())  # the issuer rotated
    clock.advance(1.0)
    with pytest.raises(InvalidToken) as unknown:
        await verifier.verify(new.token())  # too soon after the last fetch to fetch again
    assert unknown.value.reason == UNKNOWN_KEY
    for _ in range(50):  # a flood of invented kids costs no fetch
        with pytest.raises(InvalidToken):
            await verifier.verify(Issuer("made-up").token())
    assert keys.fetches == 1
    clock.advance(5.0)
    assert (await verifier.verify(new.token()))["sub"] == "u1"
    assert keys.fetches == 2


async def test_token_failures_have_their_reasons() -> None:
    issuer = Issuer()

    async def fetch() -> str:
        return issuer.jwks()

    verifier = TokenVerifier(KeySet(fetch), TokenRules("iss", "aud", leeway=_seconds(0)))
    now = int(time.time())
    other = Issuer(issuer.kid)
    cases = {
        EXPIRED: issuer.token(iat=now - 100, exp=now - 10),
        WRONG_AUDIENCE: issuer.token(aud="else"),
        FORGED: other.token(),
        MALFORMED: "a.b.c",
    }
    for reason, token in cases.items():
        with pytest.raises(InvalidToken) as refused:
            await verifier.verify(token)
        assert refused.value.reason == reason, refused.value


async def test_keys_that_cannot_be_fetched_are_no_keys_not_a_crash() -> None:
    async def fetch() -> str:
        raise ConnectionError("users is down")

    verifier = TokenVerifier(KeySet(fetch), TokenRules("iss", "aud"))
    with pytest.raises(InvalidToken) as refused:
        await verifier.verify(Issuer().token())
    assert refused.value.reason == NO_KEYS


def test_token_rules_refuse_symmetric_algorithms() -> None:
    with pytest.raises(ValueError, match="asymmetric"):
        TokenRules("iss", "aud", algorithms=("HS256",))


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=value)


# -- bearer headers and method patterns ------------------------------------------------------


def test_bearer_header_rules() -> None:
    assert bearer_token([]) is None
    assert bearer_token(["Bearer abc.def.ghi"]) == "abc.def.ghi"
    assert bearer_token(["bearer abc"]) == "abc"
    for bad in (
        ["Basic eDp5"],
        ["Bearer"],
        ["Bearer a b"],
        ["Bearer a, Bearer b"],
        ["Bearer a"] * 2,
    ):
        with pytest.raises(InvalidToken) as refused:
            bearer_token(bad)
        assert refused.value.reason == MALFORMED


def test_method_patterns() -> None:
    patterns = MethodPatterns(("pkg.Catalog/GetItem", "grpc.health.v1.Health/*"))
    assert patterns.matches("/pkg.Catalog/GetItem")
    assert patterns.matches("grpc.health.v1.Health/Watch")
    assert not patterns.matches("/pkg.Catalog/PutItem")
    assert not patterns.matches("/pkg.CatalogX/GetItem")
    with pytest.raises(ValueError, match=r"pkg\.Service/Method"):
        MethodPatterns(("pkg.Catalog",))


# -- the policy file ------------------------------------------------------------------------


def test_the_shipped_policy_loads_and_makes_the_catalog_reads_public() -> None:
    policy = load_gateway_policy(Path("services/gateway/policy.toml"))
    assert policy.auth.public.matches("/foodmesh.catalog.v1.CatalogService/ListItems")
    assert not policy.auth.public.matches("/foodmesh.catalog.v1.CatalogService/PutItem")
    assert not policy.auth.public.matches("/foodmesh.orders.v1.OrderService/PlaceOrder")
    assert policy.auth.jwks_service == "users"
    assert policy.auth.internal.matches("/foodmesh.catalog.v1.CatalogService/PutItem")
    assert policy.auth.internal.matches("/foodmesh.payments.v1.PaymentService/CapturePayment")
    assert not policy.auth.internal.matches("/foodmesh.payments.v1.PaymentService/GetPayment")


def test_the_readme_example_is_a_valid_gateway_policy() -> None:
    import re
    import tomllib

    readme = Path("README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL) if "[auth]" in b]
    assert blocks, "the README shows the gateway's policy file"
    policy = parse_gateway_policy(tomllib.loads(blocks[0]))
    assert policy.auth.public.matches("/foodmesh.users.v1.UserService/Login")
    assert policy.auth.internal.matches("/foodmesh.catalog.v1.CatalogService/PutItem")
    assert policy.cors_origins == ("https://shop.example",)
    assert policy.rate_routes[0].limit == Limit(2.0, 10)


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ({"auth": {"leeway": 3}}, "auth.leeway"),
        ({"auth": {"issuer": 3}}, "auth.issuer"),
        ({"auth": {"public": ["nope"]}}, "auth"),
        ({"auth": {"public": "pkg.S/M"}}, "auth.public"),
        ({"routes": {}}, "routes"),
    ],
)
def test_a_bad_policy_names_the_key(document: dict[str, Any], names: str) -> None:
    with pytest.raises(PolicyError, match=names):
        parse_gateway_policy(document)


# -- the merged descriptor pool --------------------------------------------------------------


def _files(file: Any) -> dict[str, bytes]:
    """`file` and everything it imports, serialized, by name."""
    copied = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(copied)
    found = {file.name: copied.SerializeToString()}
    for dependency in file.dependencies:
        found.update(_files(dependency))
    return found


def test_the_pool_adds_files_after_their_imports_and_leaves_out_what_lacks_one() -> None:
    files = _files(orders_pb2.DESCRIPTOR)
    assert "google/api/annotations.proto" in files  # the HTTP mappings' import, among others
    pool = build_pool(dict(reversed(files.items())))
    service = pool.FindServiceByName("foodmesh.orders.v1.OrderService")
    assert service.methods_by_name["WatchOrder"].server_streaming
    del files[timestamp_pb2.DESCRIPTOR.name]
    lacking = build_pool(files)
    with pytest.raises(KeyError):
        lacking.FindServiceByName("foodmesh.orders.v1.OrderService")


# -- GCRA --------------------------------------------------------------------------------------


def test_gcra_allows_a_burst_then_the_rate_and_says_when_to_retry() -> None:
    clock = FakeClock()
    limiter = GcraLimiter(clock=clock)
    limit = Limit(rate=2.0, burst=3)  # one call per 0.5 s, three at once
    decisions = [limiter.decide("ada", limit) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after == pytest.approx(0.5)
    assert limiter.decide("grace", limit).allowed  # another consumer has its own
    clock.advance(0.25)
    refused = limiter.decide("ada", limit)
    assert not refused.allowed and refused.retry_after == pytest.approx(0.25)
    clock.advance(0.25)
    assert limiter.decide("ada", limit).allowed
    assert not limiter.decide("ada", limit).allowed  # refused calls used up nothing
    clock.advance(10.0)  # idle: the whole burst is back, and no more
    assert [limiter.decide("ada", limit).allowed for _ in range(4)] == [True, True, True, False]


def test_gcra_sweeps_the_keys_it_no_longer_needs() -> None:
    clock = FakeClock()
    limiter = GcraLimiter(clock=clock, max_keys=10)
    for n in range(10):
        limiter.decide(f"client-{n}", Limit(1.0, 1))
    clock.advance(5.0)
    limiter.decide("one-more", Limit(1.0, 1))
    assert len(limiter) == 1


def test_rates_and_route_limits_from_the_policy() -> None:
    assert parse_rate("20/s") == 20.0
    assert parse_rate("600/min") == 10.0
    assert parse_rate("36/hour") == pytest.approx(0.01)
    for bad in ("20", "x/s", "5/day", "-1/s"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)
    policy = load_gateway_policy(Path("services/gateway/policy.toml"))
    limits = RateLimits(Limit(20.0, 40), policy.rate_routes)
    assert limits.for_method("/foodmesh.users.v1.UserService/Login") == Limit(2.0, 10)
    assert limits.for_method("/foodmesh.catalog.v1.CatalogService/GetItem") == Limit(20.0, 40)
    with pytest.raises(PolicyError, match=r"rate_limit\.routes\[0\]\.burst"):
        parse_gateway_policy({"rate_limit": {"routes": [{"methods": ["a.B/*"], "rate": "1/s"}]}})


# -- the HTTP/JSON transcoder ------------------------------------------------------------------


def test_path_templates_match_variables_wildcards_and_verbs() -> None:
    item = PathTemplate.parse("/v1/items/{item_id}")
    assert item.match("/v1/items/roma%20margherita") == {"item_id": "roma margherita"}
    assert item.match("/v1/items/a/b") is None
    nested = PathTemplate.parse("/v1/{name=shelves/*/books/**}:read")
    assert nested.verb == ":read"
    assert nested.match("/v1/shelves/s1/books/b/c:read") == {"name": "shelves/s1/books/b/c"}
    assert nested.match("/v1/shelves/s1/books/b") is None
    assert PathTemplate.parse("/v1/items/{item.item_id}").variables == ("item.item_id",)


def _orders_routes() -> list[HttpRoute]:
    pool = build_pool(_files(orders_pb2.DESCRIPTOR))
    return http_routes(pool, ["foodmesh.orders.v1.OrderService"])


def test_routes_come_from_the_annotations_and_verbs_win() -> None:
    routes = _orders_routes()
    watch, _ = find_route(routes, "GET", "/v1/orders/o-1:watch")
    assert watch is not None and watch.route.grpc_method.endswith("/WatchOrder")
    assert watch.route.server_streaming and watch.variables == {"order_id": "o-1"}
    get, _ = find_route(routes, "GET", "/v1/orders/o-1")
    assert get is not None and get.route.grpc_method.endswith("/GetOrder")
    missing, allowed = find_route(routes, "DELETE", "/v1/orders/o-1")
    assert missing is None and allowed == ["GET"]


def test_a_request_is_built_from_body_path_and_query_in_both_spellings() -> None:
    routes = _orders_routes()
    place, _ = find_route(routes, "POST", "/v1/orders")
    assert place is not None
    body = b'{"lines": [{"itemId": "x", "quantity": "2"}], "payment_method": "pm_card_visa"}'
    message = request_message(place, [], body)
    assert message.lines[0].item_id == "x" and message.lines[0].quantity == 2
    assert message.payment_method == "pm_card_visa"
    get, _ = find_route(routes, "GET", "/v1/orders/o-9")
    assert get is not None
    assert request_message(get, [], None).order_id == "o-9"
    for bad, names in ((b"[1]", "JSON object"), (b"{", "not JSON"), (b'{"nope": 1}', "nope")):
        with pytest.raises(BadRequest, match=names):
            request_message(place, [], bad)


def test_query_parameters_fill_the_fields_the_path_leaves() -> None:
    from foodmesh.catalog.v1 import catalog_pb2

    pool = build_pool(_files(catalog_pb2.DESCRIPTOR))
    routes = http_routes(pool, ["foodmesh.catalog.v1.CatalogService"])
    listing, _ = find_route(routes, "GET", "/v1/items")
    assert listing is not None
    query = [("restaurantId", "r1"), ("page_size", "5")]
    message = request_message(listing, query, None)
    assert (message.restaurant_id, message.page_size) == ("r1", 5)
    for bad, names in (
        ([("page_size", "five")], "page_size"),
        ([("page_size", "1"), ("page_size", "2")], "2 times"),
        ([("colour", "red")], "colour"),
    ):
        with pytest.raises(BadRequest, match=names):
            request_message(listing, bad, None)


def test_errors_map_to_http_and_grpc_gateways_body() -> None:
    assert http_status(grpc.StatusCode.UNAUTHENTICATED) == 401
    assert http_status(grpc.StatusCode.FAILED_PRECONDITION) == 400
    assert http_status(grpc.StatusCode.UNAVAILABLE) == 503
    assert json.loads(error_body(grpc.StatusCode.NOT_FOUND, "no such item")) == {
        "code": 5,
        "message": "no such item",
        "details": [],
    }


# -- descriptors from a real server's reflection -------------------------------------------------


async def test_descriptors_are_fetched_once_per_version_and_dropped_with_the_route() -> None:
    from foodmesh.catalog.v1 import catalog_pb2

    server = grpc.aio.server()
    enable_reflection(["foodmesh.catalog.v1.CatalogService"], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fetched: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            def channel_for(name: str) -> grpc.aio.Channel:
                fetched.append(name)
                return channel

            descriptors = MeshDescriptors(channel_for)
            name = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name

            def table(*versions: str) -> RouteTable:
                return RouteTable({name: Route(name, "catalog", frozenset(versions), 1)})

            assert await descriptors.refresh(table("1.0.0"))
            assert descriptors.shape_of(f"/{name}/GetItem") == "unary_unary"
            assert await descriptors.refresh(table("1.0.0"))  # nothing new: no fetch
            assert fetched == ["catalog"]
            assert await descriptors.refresh(table("1.0.0", "1.1.0"))  # a rollout
            assert fetched == ["catalog", "catalog"]
            assert descriptors.loaded("catalog") == {"1.0.0", "1.1.0"}
            assert await descriptors.refresh(RouteTable({}))
            assert descriptors.shape_of(f"/{name}/GetItem") is None
            with pytest.raises(KeyError):
                descriptors.pool.FindServiceByName(name)
    finally:
        await server.stop(None)


async def test_a_verified_token_is_cached_but_still_expires() -> None:
    issuer = Issuer()

    async def fetch() -> str:
        return issuer.jwks()

    wall, clock = [time.time()], FakeClock()
    verifier = TokenVerifier(
        KeySet(fetch),
        TokenRules("iss", "aud", leeway=_seconds(0)),
        cache_seconds=30.0,
        clock=lambda: wall[0],
        monotonic=clock,
    )
    now = int(wall[0])
    token = issuer.token(iat=now, exp=now + 10)
    signatures = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal signatures
        signatures += 1
        return real_decode(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jwt, "decode", counting_decode)
        for _ in range(5):
            assert (await verifier.verify(token))["sub"] == "u1"
        assert signatures == 1  # verified once, then from the cache
        wall[0] = now + 11.0  # past exp: the cached token is refused all the same
        with pytest.raises(InvalidToken) as expired:
            await verifier.verify(token)
        assert expired.value.reason == EXPIRED
        fresh = issuer.token(iat=now, exp=now + 100)
        await verifier.verify(fresh)
        clock.advance(31.0)  # kept no longer than cache_seconds: verified again
        await verifier.verify(fresh)
        assert signatures == 3
