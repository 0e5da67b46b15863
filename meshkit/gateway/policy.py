"""The gateway's policy file: which methods need a token, and what a token must say.

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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from mesh.policy import PolicyError
from meshkit.gateway.auth import MethodPatterns
from meshkit.gateway.tokens import TokenRules

_AUTH_KEYS = frozenset({"issuer", "audience", "leeway_seconds", "jwks_service", "public"})


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """Who may call what: the token rules and the public methods."""

    rules: TokenRules = field(default_factory=lambda: TokenRules("foodmesh-users", "foodmesh"))
    jwks_service: str = "users"
    public: MethodPatterns = field(default_factory=MethodPatterns)


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    auth: AuthPolicy = field(default_factory=AuthPolicy)


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
    unknown = sorted(set(document) - {"auth"})
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r} (known: auth)")
    auth = document.get("auth", {})
    if not isinstance(auth, dict):
        raise PolicyError(f"auth: must be a table, got {auth!r}")
    unknown = sorted(set(auth) - _AUTH_KEYS)
    if unknown:
        known = ", ".join(sorted(_AUTH_KEYS))
        raise PolicyError(f"auth.{unknown[0]}: unknown key (known: {known})")
    defaults = AuthPolicy()
    leeway = _value(auth, "leeway_seconds", (int, float), defaults.rules.leeway.total_seconds())
    public = _value(auth, "public", list, [])
    if not all(isinstance(item, str) for item in public):
        raise PolicyError("auth.public: must be a list of strings (pkg.Service/Method)")
    try:
        rules = TokenRules(
            issuer=_value(auth, "issuer", str, defaults.rules.issuer),
            audience=_value(auth, "audience", str, defaults.rules.audience),
            leeway=timedelta(seconds=leeway),
        )
        patterns = MethodPatterns(tuple(public))
    except ValueError as exc:
        raise PolicyError(f"auth: {exc}") from None
    jwks_service = _value(auth, "jwks_service", str, defaults.jwks_service)
    return GatewayPolicy(AuthPolicy(rules, jwks_service, patterns))


def _value(table: dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PolicyError(f"auth.{key}: must be a {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: Any) -> str:
    names = {str: "string", list: "list", (int, float): "number"}
    return names.get(kind, str(kind))
