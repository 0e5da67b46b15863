"""The gateway's policy file: which methods need a token, what a token must say, and the
routes whose rate limits differ from the default.

TOML, like the mesh's policy (mesh/policy.py), read once at start-up; a bad file stops the
gateway with a message naming the key.

    [auth]
    issuer = "foodmesh-users"        # the tokens' iss
    audience = "foodmesh"            # the tokens' aud
    leeway_seconds = 30              # clock skew tolerated on exp, nbf and iat
    jwks_service = "users"           # the Consul service whose key set verifies tokens
    public = [                       # served without a token; every other method needs one
        "foodmesh.catalog.v1.CatalogService/GetItem",
        "grpc.health.v1.Health/*",
    ]
    internal = [                     # not served at the edge at all (PERMISSION_DENIED)
        "foodmesh.payments.v1.PaymentService/CapturePayment",
    ]

    [http]
    cors_origins = ["https://shop.example"]   # pages that may call the HTTP port (CORS)

    [[rate_limit.routes]]            # limits other than the default (--rate-limit, --rate-burst)
    methods = ["foodmesh.users.v1.UserService/Login"]   # the first route that matches wins
    rate = "1/s"                     # N/s, N/min or N/hour, per consumer (user, or address)
    burst = 5
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from mesh.policy import PolicyError
from meshkit.gateway.auth import MethodPatterns
from meshkit.gateway.ratelimit import Limit, RouteLimit, parse_rate
from meshkit.gateway.tokens import TokenRules

_AUTH_KEYS = frozenset(
    {"issuer", "audience", "leeway_seconds", "jwks_service", "public", "internal"}
)
_ROUTE_KEYS = frozenset({"methods", "rate", "burst"})


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """Who may call what: the token rules and the public methods."""

    rules: TokenRules = field(default_factory=lambda: TokenRules("foodmesh-users", "foodmesh"))
    jwks_service: str = "users"
    public: MethodPatterns = field(default_factory=MethodPatterns)
    internal: MethodPatterns = field(default_factory=MethodPatterns)
    """Methods the edge does not serve at all (PERMISSION_DENIED): calls inside the mesh."""


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    cors_origins: tuple[str, ...] = ()
    """Origins whose pages may call the HTTP port (HTTP/JSON and gRPC-Web) from a browser."""
    rate_routes: tuple[RouteLimit, ...] = ()
    """Routes whose limits differ from the default (which the gateway's flags set)."""


def load_gateway_policy(path: str | Path) -> GatewayPolicy:
    """The policy in the TOML file at `path`; PolicyError (naming the key) when invalid."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    return parse_gateway_policy(document)


def parse_gateway_policy(document: dict[str, Any]) -> GatewayPolicy:
    _known(document, frozenset({"auth", "rate_limit", "http"}), "")
    http = _table(document, "http", "")
    _known(http, frozenset({"cors_origins"}), "http")
    origins = _value(http, "cors_origins", list, [], "http")
    if not all(isinstance(o, str) and o.startswith(("http://", "https://")) for o in origins):
        raise PolicyError("http.cors_origins: must be a list of origins like https://shop.example")
    auth = _table(document, "auth", "")
    rate_limit = _table(document, "rate_limit", "")
    _known(rate_limit, frozenset({"routes"}), "rate_limit")
    routes = _value(rate_limit, "routes", list, [], "rate_limit")
    return GatewayPolicy(
        auth=_auth(auth),
        cors_origins=tuple(origins),
        rate_routes=tuple(
            _route(route, f"rate_limit.routes[{i}]") for i, route in enumerate(routes)
        ),
    )


def _route(route: Any, path: str) -> RouteLimit:
    if not isinstance(route, dict):
        raise PolicyError(f"{path}: must be a table, got {route!r}")
    _known(route, _ROUTE_KEYS, path)
    missing = sorted(_ROUTE_KEYS - set(route))
    if missing:
        raise PolicyError(f"{path}.{missing[0]}: missing")
    methods = _value(route, "methods", list, [], path)
    try:
        return RouteLimit(
            MethodPatterns(tuple(str(m) for m in methods)),
            Limit(
                parse_rate(_value(route, "rate", str, "", path)),
                _value(route, "burst", int, 1, path),
            ),
        )
    except ValueError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _auth(auth: dict[str, Any]) -> AuthPolicy:
    _known(auth, _AUTH_KEYS, "auth")
    defaults = AuthPolicy()
    leeway = _value(auth, "leeway_seconds", (int, float), defaults.rules.leeway.total_seconds())
    public = _value(auth, "public", list, [])
    internal = _value(auth, "internal", list, [])
    for key, items in (("public", public), ("internal", internal)):
        if not all(isinstance(item, str) for item in items):
            raise PolicyError(f"auth.{key}: must be a list of strings (pkg.Service/Method)")
    try:
        rules = TokenRules(
            issuer=_value(auth, "issuer", str, defaults.rules.issuer),
            audience=_value(auth, "audience", str, defaults.rules.audience),
            leeway=timedelta(seconds=leeway),
        )
        patterns = MethodPatterns(tuple(public))
        hidden = MethodPatterns(tuple(internal))
    except ValueError as exc:
        raise PolicyError(f"auth: {exc}") from None
    jwks_service = _value(auth, "jwks_service", str, defaults.jwks_service)
    return AuthPolicy(rules, jwks_service, patterns, hidden)


def _known(table: dict[str, Any], keys: frozenset[str], path: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise PolicyError(f"{where}: unknown key (known: {', '.join(sorted(keys))})")


def _table(table: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    return dict(_value(table, key, dict, {}, path))


def _value(table: dict[str, Any], key: str, kind: Any, default: Any, path: str = "auth") -> Any:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        where = f"{path}.{key}" if path else key
        raise PolicyError(f"{where}: must be a {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: Any) -> str:
    names = {str: "string", list: "list", dict: "table", int: "integer", (int, float): "number"}
    return names.get(kind, str(kind))
