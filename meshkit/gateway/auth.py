"""Authentication at the edge: a bearer token on every call that needs one.

The AuthInterceptor runs in the gateway's server (inside the deadline layer, so a JWKS fetch
is bounded by the call's time) around every method: it reads `authorization: Bearer <token>`
from the call's metadata (gRPC metadata and HTTP headers are the same thing here), verifies
the token (meshkit/gateway/tokens.py) and records its subject in the call (calls.py), which
the router sends on as `x-user-id` and rate limiting counts as the consumer. A call to a
method that is not public and carries no token, or whose token does not verify, fails with
UNAUTHENTICATED and a message that says which of missing, malformed, expired, not yet valid,
forged, unknown key, wrong issuer or wrong audience it was; more than one token is refused as
malformed (RFC 6750 allows one).

A method the policy file lists as internal (a saga's step, an operator's write) is not served
at the edge at all: PERMISSION_DENIED, token or not. A public method is served without a
token; one that comes anyway is verified all the same, so a bad token is never silently
ignored (Envoy's `allow_missing`).
Calls to a service the mesh does not have pass untouched: the router answers them
UNIMPLEMENTED, which is the more useful answer.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc import aio

from mesh.server.hooks import BehaviorInterceptor, Exit, Hook
from meshkit.gateway.calls import call_of
from meshkit.gateway.tokens import MALFORMED, InvalidToken, TokenVerifier

MISSING = "missing"
INTERNAL = "internal"
AUTHORIZATION = "authorization"
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)

Outcome = Callable[[str, str], None]
"""Told (method, outcome) for every call: `ok`, `anonymous`, or why a token was refused."""


@dataclass(frozen=True, slots=True)
class MethodPatterns:
    """Method names, `pkg.Service/Method`, with `*` wildcards (`pkg.Service/*`, `pkg.*`)."""

    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            if not pattern or ("/" not in pattern.strip("/") and pattern != "*"):
                raise ValueError(
                    f"method pattern {pattern!r}: expected pkg.Service/Method or pkg.Service/*"
                )

    def matches(self, method: str) -> bool:
        """Whether `/pkg.Service/Method` (leading slash or not) is one of them."""
        name = method.lstrip("/")
        return any(fnmatch.fnmatchcase(name, pattern.lstrip("/")) for pattern in self.patterns)


def bearer_token(values: Sequence[str]) -> str | None:
    """The token of the `authorization` values of one call (None when there is none)."""
    if not values:
        return None
    if len(values) > 1 or "," in values[0]:
        raise InvalidToken(MALFORMED, "more than one authorization header: send one token")
    found = _BEARER.match(values[0])
    if found is None:
        raise InvalidToken(MALFORMED, "the authorization header is not `Bearer <token>`")
    return found.group(1)


def refusal_message(method: str, error: InvalidToken | None) -> str:
    """What an UNAUTHENTICATED caller is told (never the token)."""
    if error is None:
        return f"missing token: {method} needs an `authorization: Bearer <token>` header"
    return f"{error.reason.replace('_', ' ')} token: {error}"


class AuthInterceptor(BehaviorInterceptor):
    """Verifies the bearer token of each call that needs one (see the module docstring)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        public: MethodPatterns,
        *,
        internal: MethodPatterns = MethodPatterns(),
        applies: Callable[[str], bool] = lambda method: True,
        on_outcome: Outcome | None = None,
    ) -> None:
        super().__init__()
        self._verifier = verifier
        self._public = public
        self._internal = internal
        self._applies = applies
        self._on_outcome = on_outcome or (lambda method, outcome: None)

    def hook_for(self, method: str) -> Hook:
        public = self._public.matches(method)
        internal = self._internal.matches(method)
        verifier, applies, told = self._verifier, self._applies, self._on_outcome

        async def enter(context: aio.ServicerContext[Any, Any]) -> Exit | None:
            if not applies(method):
                return None
            call = call_of(context)
            if internal:
                call.auth = INTERNAL
                told(method, INTERNAL)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} is internal to the mesh: the gateway does not serve it",
                )
            values = authorization_values(context.invocation_metadata() or ())
            try:
                token = bearer_token(values)
                if token is None:
                    if public:
                        call.auth = "anonymous"
                        told(method, call.auth)
                        return None
                    call.auth = MISSING
                    told(method, MISSING)
                    await _refuse(context, refusal_message(method, None))
                claims = await verifier.verify(token)
            except InvalidToken as error:
                call.auth = error.reason
                told(method, error.reason)
                await _refuse(context, refusal_message(method, error))
            call.auth, call.user = "ok", str(claims["sub"])
            told(method, call.auth)
            return None

        return enter


def authorization_values(metadata: Iterable[tuple[str, Any]]) -> list[str]:
    return [str(value) for key, value in metadata if key == AUTHORIZATION]


async def _refuse(context: aio.ServicerContext[Any, Any], message: str) -> NoReturn:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        message,
        (("www-authenticate", 'Bearer error="invalid_token"'),),
    )
