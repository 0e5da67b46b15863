"""foodmesh.users.v1.UserService on top of UsersStore, PasswordHasher and TokenIssuer.

Everything the request alone can show wrong is refused first, with INVALID_ARGUMENT naming
the field and before any KDF run or write. The limits are NIST SP 800-63B's for passwords (at
least 8 characters; long passphrases allowed, but at most 256 so the KDF cannot be fed
megabytes) and RFC 5321's for emails (254 characters). An email must be ASCII, have the
WHATWG (HTML) "valid e-mail address" form, and a dotted domain, since mail to a dotless domain
does not get delivered on the public internet; it is stored in lower case, so that Ada@x.org
and ada@x.org are one account.

Login answers a wrong password and an unknown email alike: one UNAUTHENTICATED message, and the
same KDF work (PasswordHasher.verify runs scrypt with no stored hash too), so neither the answer
nor its timing tells which emails have an account. A right password whose hash was made with
older scrypt parameters is rehashed with the current ones on the way.

Logs name users by user_id only: no email, no password, no token.
"""

from __future__ import annotations

import logging
import re
import unicodedata

import grpc

from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from meshkit.storage.idempotency import key_problem
from services.refusals import Refusal, invalid, not_found, refusing
from services.users.keystore import jwks_json
from services.users.passwords import PasswordHasher
from services.users.store import CREATE, NewUser, UsersStore, user_message
from services.users.tokens import TOKEN_TYPE, TokenIssuer

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256
MAX_DISPLAY_NAME_LENGTH = 100
WRONG_CREDENTIALS = "email or password is wrong"

# WHATWG's valid e-mail address, with at least one dot in the domain.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]+@{_LABEL}(?:\.{_LABEL})+")

ServicerContext = grpc.aio.ServicerContext[object, object]
_log = logging.getLogger(__name__)


class UserServicer(users_pb2_grpc.UserServiceServicer):
    """Creates users, logs them in and publishes the token keys."""

    def __init__(self, store: UsersStore, hasher: PasswordHasher, tokens: TokenIssuer) -> None:
        self._store = store
        self._hasher = hasher
        self._tokens = tokens

    @refusing
    async def CreateUser(
        self, request: users_pb2.CreateUserRequest, context: ServicerContext
    ) -> users_pb2.User:
        email, display_name = check_create_request(request)
        key = CREATE.key_of(request)
        earlier = await self._store.user_for_key(key)
        if earlier is not None:
            return earlier
        if await self._store.credentials(email) is not None:
            # Refused before the ~0.3 s of hashing (the store checks again, atomically),
            # unless the account is this request's own: a concurrent duplicate may have
            # created it (with its key, in one transaction) since the lookup above.
            earlier = await self._store.user_for_key(key)
            if earlier is not None:
                return earlier
            raise Refusal(
                grpc.StatusCode.ALREADY_EXISTS, f"email {email!r} belongs to another user"
            )
        password_hash = await self._hasher.hash(request.password)
        outcome = await self._store.create(NewUser(email, display_name, password_hash), key)
        if outcome.created:
            _log.info("created user %s", outcome.user.user_id)
        return outcome.user

    @refusing
    async def Login(
        self, request: users_pb2.LoginRequest, context: ServicerContext
    ) -> users_pb2.LoginResponse:
        email = check_login_request(request)
        found = await self._store.credentials(email)
        stored = None if found is None else found.password_hash
        if not await self._hasher.verify(request.password, stored) or found is None:
            _log.info("login refused: unknown email or wrong password")
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, WRONG_CREDENTIALS)
        user_id = found.user.user_id
        if self._hasher.needs_rehash(found.password_hash):
            rehashed = await self._hasher.hash(request.password)
            if await self._store.replace_password_hash(user_id, found.password_hash, rehashed):
                _log.info("user %s: password rehashed with the current scrypt parameters", user_id)
        token = await self._tokens.issue(user_id)
        _log.info("user %s logged in: token %s signed by key %s", user_id, token.jti, token.kid)
        return users_pb2.LoginResponse(
            access_token=token.access_token,
            token_type=TOKEN_TYPE,
            expires_in=token.expires_in,
            user_id=user_id,
        )

    @refusing
    async def GetUser(
        self, request: users_pb2.GetUserRequest, context: ServicerContext
    ) -> users_pb2.User:
        if not request.user_id:
            raise invalid("user_id must not be empty")
        user = await self._store.get(request.user_id)
        if user is None:
            raise not_found(f"user_id {request.user_id!r}: no such user")
        return user_message(user)

    async def GetJwks(
        self, request: users_pb2.GetJwksRequest, context: ServicerContext
    ) -> users_pb2.GetJwksResponse:
        return users_pb2.GetJwksResponse(jwks_json=jwks_json(await self._store.keys.published()))


def check_create_request(request: users_pb2.CreateUserRequest) -> tuple[str, str]:
    """The normalized email and display name of a valid request; INVALID_ARGUMENT naming the
    field when the request is wrong on its face."""
    email = normalized_email(request.email)
    if not _EMAIL.fullmatch(email):
        raise invalid(
            f"email {request.email.strip()!r} is not an email address: use the form "
            "name@example.com (ASCII only, with a dotted domain)"
        )
    display_name = request.display_name.strip()
    if not display_name:
        raise invalid("display_name must not be empty")
    if len(display_name) > MAX_DISPLAY_NAME_LENGTH:
        raise invalid(
            f"display_name has {len(display_name)} characters; "
            f"the most is {MAX_DISPLAY_NAME_LENGTH}"
        )
    if any(unicodedata.category(character) == "Cc" for character in display_name):
        raise invalid("display_name must not contain control characters")
    if len(request.password) < MIN_PASSWORD_LENGTH:
        raise invalid(
            f"password has {len(request.password)} characters; the least is {MIN_PASSWORD_LENGTH}"
        )
    _check_password_length(request.password)
    problem = key_problem(request.idempotency_key)
    if problem is not None:
        raise invalid(problem)
    return email, display_name


def check_login_request(request: users_pb2.LoginRequest) -> str:
    """The normalized email of a request that can be checked; INVALID_ARGUMENT naming the
    field for one that cannot (what it says is true of any account, so it tells nothing)."""
    email = normalized_email(request.email)
    if not request.password:
        raise invalid("password must not be empty")
    _check_password_length(request.password)
    return email


def normalized_email(email: str) -> str:
    """The email without surrounding spaces, in lower case; INVALID_ARGUMENT when it is
    empty or too long."""
    email = email.strip().lower()
    if not email:
        raise invalid("email must not be empty")
    if len(email) > MAX_EMAIL_LENGTH:
        raise invalid(f"email has {len(email)} characters; the most is {MAX_EMAIL_LENGTH}")
    return email


def _check_password_length(password: str) -> None:
    if len(password) > MAX_PASSWORD_LENGTH:
        raise invalid(f"password has {len(password)} characters; the most is {MAX_PASSWORD_LENGTH}")
