"""`python -m services.gateway`: one gateway instance, registered in Consul as `gateway`.

It routes every gRPC service the mesh has, by the name in the call's path, learnt from Consul
(meshkit/gateway/), serves merged reflection of them all, and requires a token from users'
Login on every method its policy file does not list as public, and limits each consumer's
rate on each route (GCRA; --rate-limit and --rate-burst, and the policy file's routes):

    python -m services.gateway --port 8080 --gateway-policy services/gateway/policy.toml
    grpcurl -plaintext 127.0.0.1:8080 list

It keeps no state: run as many as you like.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.discovery.consul_settings import ConsulSettings
from mesh.policy import PolicyError
from meshkit.gateway import CatalogWatch, Gateway, KeySet, TokenVerifier, load_gateway_policy
from meshkit.gateway.http import HttpEdge
from meshkit.gateway.observe import GatewayMetrics
from meshkit.gateway.ratelimit import Limit, RateLimits, parse_rate
from meshkit.gateway.ratelimit_redis import RedisLimiter
from services.cli import port_number, positive_int
from services.runtime import ServiceRuntime

SERVICE = "gateway"
DEFAULT_POLICY = Path(__file__).with_name("policy.toml")
STOREFRONT = Path(__file__).with_name("storefront")
JWKS_TIMEOUT_S = 5.0
DEFAULT_LIMIT = Limit(20.0, 40)
log = logging.getLogger(__name__)


def flags(parser: argparse.ArgumentParser) -> None:
    edge = parser.add_argument_group("the edge")
    edge.add_argument(
        "--gateway-policy",
        type=Path,
        default=DEFAULT_POLICY,
        metavar="FILE",
        help="TOML file of the public methods, token rules and per-route rate limits "
        "(default: the platform's, services/gateway/policy.toml)",
    )
    edge.add_argument(
        "--http-port",
        type=port_number,
        default=0,
        metavar="PORT",
        help="port of HTTP/JSON, gRPC-Web and the storefront on --host; 0 takes any free "
        "port (default: %(default)s)",
    )
    edge.add_argument(
        "--rate-limit",
        type=rate,
        default=DEFAULT_LIMIT.rate,
        metavar="N/s",
        help="each consumer's (user's, or address's) rate on each route the policy file "
        "does not set: N/s, N/min or N/hour (default: 20/s)",
    )
    edge.add_argument(
        "--rate-limit-store",
        default=None,
        metavar="URL",
        help="redis://HOST:PORT/DB to share the rate limits' state between gateway replicas "
        "(fails open when Redis is down); default: each gateway counts on its own",
    )
    edge.add_argument(
        "--rate-burst",
        type=positive_int,
        default=DEFAULT_LIMIT.burst,
        metavar="N",
        help="the calls a consumer may make at once on such a route (default: %(default)s)",
    )


def rate(text: str) -> float:
    """An argparse type: a rate, N/s, N/min or N/hour, in calls per second."""
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv, flags) as runtime:
        try:
            policy = load_gateway_policy(runtime.args.gateway_policy)
        except PolicyError as exc:
            print(f"python -m services.{SERVICE}: gateway policy: {exc}", file=sys.stderr)
            return 2
        auth = policy.auth

        async def jwks() -> str:
            stub = users_pb2_grpc.UserServiceStub(gateway.channel(auth.jwks_service))
            answer = await stub.GetJwks(users_pb2.GetJwksRequest(), timeout=JWKS_TIMEOUT_S)
            return answer.jwks_json

        metrics = GatewayMetrics(runtime.metrics.registry) if runtime.metrics else None
        limiter = None
        if runtime.args.rate_limit_store:
            shared = RedisLimiter(
                runtime.args.rate_limit_store,
                on_error=metrics.store_errors.inc if metrics is not None else None,
            )
            limiter = await runtime.closing(asyncio.sleep(0, result=shared))  # closed at exit
            log.info("rate limits shared through %s", shared.url)
        gateway = Gateway(
            runtime.channel,
            verifier=TokenVerifier(KeySet(jwks), auth.rules),
            public=auth.public,
            internal=auth.internal,
            traces=runtime.tracing is not None,
            metrics=metrics,
            limiter=limiter,
            rate_limits=RateLimits(
                Limit(runtime.args.rate_limit, runtime.args.rate_burst), policy.rate_routes
            ),
        )
        server = runtime.server(interceptors=gateway.interceptors)
        gateway.install(server)
        http = HttpEdge(
            gateway.descriptors,
            lambda: gateway.router.table,
            lambda: server.address,
            cors_origins=policy.cors_origins,
            static_dir=STOREFRONT if STOREFRONT.is_dir() else None,
            on_decode=metrics.decoded.labels("http").inc if metrics is not None else None,
        )

        async def serve_http() -> None:
            port = await http.start(runtime.args.host, runtime.args.http_port)
            log.info(
                "HTTP/JSON, gRPC-Web and the storefront on http://%s:%d/", runtime.args.host, port
            )

        server.on_started(serve_http)
        server.on_shutdown(http.stop)
        watch, close_watch = CatalogWatch.consul(ConsulSettings.from_env())
        runtime.background(gateway.follow(aiter(watch)), "route table", then=close_watch)
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
