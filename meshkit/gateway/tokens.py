"""Verifying JWT access tokens (RFC 7519) against an issuer's published JWK Set (RFC 7517).

PyJWT does the cryptography and the claim checks; this module adds what an edge needs
around it:

- `verify_jwt`: one token against one key set, with the algorithms fixed by the verifier
  (never chosen by the token, so no "none" and no HS256 signed with a public key), the key
  named by the token's `kid`, `iss`, `aud`, `exp`/`nbf`/`iat` with a leeway for clock skew,
  and the claims that must be there. Every failure is an InvalidToken whose `reason` is a
  short word (for metrics and for the caller's message) and whose message says what was
  wrong, never the token itself.
- `KeySet`: the issuer's keys, fetched once and kept; a token naming a key the set lacks
  (the issuer rotated) makes it fetch again, but at most once per `min_refetch` seconds, so a
  flood of tokens with invented kids cannot turn into a flood of fetches.
- `TokenVerifier`: the two together, with a cache of the tokens it verified (Envoy's
  jwt_authn caches them too): a client sends the same token with every call, and verifying
  an ES256 signature costs about 150 us of CPU here, more than the rest of the gateway's own
  work on a call. A cached token is still checked against the clock (exp, nbf) on every use,
  and kept at most `cache_seconds`, so a key's retirement reaches it soon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt

log = logging.getLogger(__name__)

MALFORMED = "malformed"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
FORGED = "forged"
UNKNOWN_KEY = "unknown_key"
WRONG_ISSUER = "wrong_issuer"
WRONG_AUDIENCE = "wrong_audience"
MISSING_CLAIM = "missing_claim"
NO_KEYS = "no_keys"


class InvalidToken(Exception):
    """A token that does not verify; `reason` is one of the constants above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_REASONS: tuple[tuple[type[jwt.InvalidTokenError], str], ...] = (
    (jwt.ExpiredSignatureError, EXPIRED),
    (jwt.ImmatureSignatureError, NOT_YET_VALID),
    (jwt.InvalidAudienceError, WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, WRONG_ISSUER),
    (jwt.MissingRequiredClaimError, MISSING_CLAIM),
    (jwt.InvalidSignatureError, FORGED),
    (jwt.InvalidAlgorithmError, FORGED),
)


def key_set_from_json(jwks_json: str) -> jwt.PyJWKSet:
    """The JWK Set `jwks_json` holds; InvalidToken(NO_KEYS) when it is not a usable one."""
    try:
        return jwt.PyJWKSet.from_json(jwks_json)
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError) as error:
        raise InvalidToken(NO_KEYS, f"the key set is not a usable JWK Set: {error}") from None


def token_kid(token: str) -> str:
    """The `kid` in the token's header (not yet verified)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as error:
        raise InvalidToken(MALFORMED, f"the token is malformed: {error}") from None
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken(MALFORMED, "the token's header names no key (kid)")
    return kid


def verify_jwt(
    token: str,
    key_set: jwt.PyJWKSet,
    *,
    issuer: str,
    audience: str,
    algorithms: Sequence[str] = ("ES256",),
    leeway: timedelta = timedelta(0),
    required: Sequence[str] = ("sub", "iss", "aud", "iat", "exp"),
) -> dict[str, Any]:
    """The claims of `token` if a key of `key_set` verifies it for `issuer` and `audience`
    now; InvalidToken otherwise."""
    kid = token_kid(token)
    try:
        key = key_set[kid]
    except KeyError:
        message = f"no key {kid!r} in the key set (retired, or not ours)"
        raise InvalidToken(UNKNOWN_KEY, message) from None
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": list(required)},
        )
    except jwt.InvalidTokenError as error:
        reason = next((r for kind, r in _REASONS if isinstance(error, kind)), MALFORMED)
        raise InvalidToken(reason, f"the token does not verify: {error}") from None
    return claims


class KeySet:
    """An issuer's JWK Set, fetched with `fetch` (its JSON) and kept until a token names a
    key it lacks; refetched then at most once per `min_refetch` seconds."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[str]],
        *,
        min_refetch: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._min_refetch = min_refetch
        self._clock = clock
        self._keys: jwt.PyJWKSet | None = None
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def keys_for(self, kid: str) -> jwt.PyJWKSet:
        """The key set, fetched again first if it lacks `kid` and the last fetch is old
        enough; InvalidToken(NO_KEYS) when no set could be had at all."""
        keys = self._keys
        if keys is not None and _has(keys, kid):
            return keys
        async with self._lock:
            keys = self._keys
            if keys is not None and _has(keys, kid):
                return keys
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at >= self._min_refetch:
                self._fetched_at = now
                self.fetches += 1
                try:
                    self._keys = keys = key_set_from_json(await self._fetch())
                except InvalidToken:
                    raise
                except Exception as error:
                    log.warning("could not fetch the token keys: %s", error)
            if keys is None:
                raise InvalidToken(NO_KEYS, "the token keys are not available; try again")
            return keys


def _has(keys: jwt.PyJWKSet, kid: str) -> bool:
    try:
        keys[kid]
    except KeyError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What a token must say to be accepted."""

    issuer: str
    audience: str
    leeway: timedelta = timedelta(seconds=30)
    algorithms: tuple[str, ...] = ("ES256", "EdDSA")

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience must not be empty")
        if self.leeway < timedelta(0):
            raise ValueError("leeway must be >= 0")
        symmetric = any(a.upper().startswith(("HS", "NONE")) for a in self.algorithms)
        if not self.algorithms or symmetric:
            raise ValueError("algorithms must be asymmetric ones (ES256, EdDSA, RS256, ...)")


class TokenVerifier:
    """Verifies tokens against an issuer's key set under `rules` (see the module docstring
    for its cache)."""

    def __init__(
        self,
        keys: KeySet,
        rules: TokenRules,
        *,
        cache_size: int = 10_000,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.rules = rules
        self._cache: OrderedDict[str, tuple[float, Mapping[str, Any]]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._monotonic = monotonic

    async def verify(self, token: str) -> Mapping[str, Any]:
        """The verified claims of `token`; InvalidToken otherwise."""
        cached = self._cache.get(token)
        if cached is not None:
            kept_until, claims = cached
            if self._monotonic() < kept_until:
                self._check_times(claims)
                return claims
            del self._cache[token]
        key_set = await self.keys.keys_for(token_kid(token))
        rules = self.rules
        claims = verify_jwt(
            token,
            key_set,
            issuer=rules.issuer,
            audience=rules.audience,
            algorithms=rules.algorithms,
            leeway=rules.leeway,
        )
        self._cache[token] = (self._monotonic() + self._cache_seconds, claims)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        """exp and nbf again, for a token verified earlier (the same rule as PyJWT's)."""
        now, leeway = self._clock(), self.rules.leeway.total_seconds()
        if "exp" in claims and now >= float(claims["exp"]) + leeway:
            raise InvalidToken(EXPIRED, "the token does not verify: Signature has expired")
        if "nbf" in claims and now < float(claims["nbf"]) - leeway:
            raise InvalidToken(NOT_YET_VALID, "the token does not verify: not yet valid (nbf)")
