"""Access tokens: JWTs (RFC 7519) signed ES256 by the users service, and their verification by
anyone holding its key set (GetJwks), with PyJWT.

A token's header names its key (`kid`); its claims are `sub` (the user_id), `iss`, `aud`,
`iat`, `exp` and `jti` (a random token id, for logs and a future revocation list). Times are
whole seconds (NumericDate). The issuer reads the clock *before* it reads the signing key, so a
token signed just before a rotation never outlives its key's place in the key set (keystore.py).

    verified = verify_token(token, jwks_json, issuer="foodmesh-users", audience="foodmesh")
    verified.user_id  # the sub claim

verify_token checks the signature with the key the token's kid names (only ES256 is accepted,
so a token cannot choose a weaker algorithm or "none"), then iss, aud, exp and iat, and that
every claim above is present; it is meshkit.gateway.tokens.verify_jwt (what the gateway
verifies with) over a key set given as GetJwks's JSON. Every failure is one InvalidToken whose
message says what was wrong, never the token itself: the caller answers UNAUTHENTICATED.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import jwt

from meshkit.gateway.tokens import InvalidToken as InvalidToken
from meshkit.gateway.tokens import key_set_from_json, token_kid, verify_jwt

if TYPE_CHECKING:  # verifying tokens needs no database
    from services.users.keystore import SigningKeys

ALGORITHM = "ES256"
TOKEN_TYPE = "Bearer"
REQUIRED_CLAIMS = ("sub", "iss", "aud", "iat", "exp", "jti")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """What the tokens of this deployment say and how long they live."""

    issuer: str = "foodmesh-users"
    audience: str = "foodmesh"
    ttl_s: int = 3600

    def __post_init__(self) -> None:
        if self.ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {self.ttl_s}")
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience must not be empty")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token and what a LoginResponse says about it."""

    access_token: str
    expires_in: int
    kid: str
    jti: str


class TokenIssuer:
    """Signs access tokens with the key ring's signing key."""

    def __init__(
        self, keys: SigningKeys, settings: TokenSettings, *, clock: Clock = utc_now
    ) -> None:
        self._keys = keys
        self.settings = settings
        self._clock = clock

    async def issue(self, user_id: str) -> IssuedToken:
        """A new token for the user, signed by the newest key."""
        issued_at = int(self._clock().timestamp())  # before the key: see keystore.py
        key = await self._keys.signing_key(self.settings.ttl_s)
        jti = uuid.uuid4().hex
        claims = {
            "sub": user_id,
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "iat": issued_at,
            "exp": issued_at + self.settings.ttl_s,
            "jti": jti,
        }
        token = jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
        return IssuedToken(token, self.settings.ttl_s, key.kid, jti)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The claims of a token that verified."""

    user_id: str
    issuer: str
    audience: str
    issued_at: datetime
    expires_at: datetime
    token_id: str
    kid: str


def verify_token(
    token: str,
    jwks_json: str,
    *,
    issuer: str,
    audience: str,
    leeway: timedelta = timedelta(0),
) -> VerifiedToken:
    """The claims of `token` if the key set `jwks_json` (GetJwks) verifies it for `issuer`
    and `audience` now; InvalidToken otherwise. `leeway` tolerates that much clock skew on
    exp and iat."""
    claims = verify_jwt(
        token,
        key_set_from_json(jwks_json),
        issuer=issuer,
        audience=audience,
        algorithms=[ALGORITHM],
        leeway=leeway,
        required=REQUIRED_CLAIMS,
    )
    return VerifiedToken(
        user_id=claims["sub"],
        issuer=claims["iss"],
        audience=audience,
        issued_at=datetime.fromtimestamp(claims["iat"], UTC),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        token_id=str(claims["jti"]),
        kid=token_kid(token),
    )
