"""UserService on real in-process grpc.aio servers and real databases (a SQLite file, and a
Postgres database: each test that takes `locate` runs on both): accounts and their refusals
(naming the field, storing nothing), the idempotency ledger under concurrent duplicates on two
instances, passwords kept only as scrypt hashes and never logged, logins whose JWTs verify
against GetJwks, one answer for a wrong password and an unknown email, and signing key rotation
on an injected clock, by the keys command too: old tokens keep verifying until the old key
retires. What only a SQLite file has (its mode, its bytes) is tested on SQLite alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
import pytest

from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from mesh.testing import InProcessServer
from meshkit.storage.database import open_database
from services.cli import parse_args
from services.datadir import database_path
from services.users import InvalidToken, verify_token
from services.users import keys as keys_command
from services.users.__main__ import flags
from services.users.passwords import PasswordHasher, ScryptParams
from services.users.servicer import WRONG_CREDENTIALS, UserServicer
from services.users.store import UsersStore
from services.users.tokens import TokenIssuer, TokenSettings
from tests.conftest import Locate
from tests.unit.demo_services import count_rows, rpc_error

if TYPE_CHECKING:
    from foodmesh.users.v1.users_pb2_grpc import UserServiceAsyncStub as UsersStub

FAST = ScryptParams(log2_n=10, r=8, p=1)  # cheap for tests; production uses the defaults
ISSUER, AUDIENCE, TTL = "foodmesh-users", "foodmesh", 3600
PASSWORD = "correct horse battery"
TABLES = ("users", "idempotent_requests")
NOTHING_STORED = dict.fromkeys(TABLES, 0)
Location = Path | str
"""A users database: a SQLite file's path, or a Postgres URL."""
# In the past, so that PyJWT (which reads the real time) accepts the iat of tokens stamped
# with it, and tokens live on in real time for the whole test.
START = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)


class Clock:
    """A wall clock that moves only when told to."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def create_request(**fields: Any) -> users_pb2.CreateUserRequest:
    values: dict[str, Any] = {
        "email": "ada@example.com",
        "display_name": "Ada Lovelace",
        "password": PASSWORD,
    }
    values.update(fields)
    return users_pb2.CreateUserRequest(**values)


def login_request(
    email: str = "ada@example.com", password: str = PASSWORD
) -> users_pb2.LoginRequest:
    return users_pb2.LoginRequest(email=email, password=password)


@dataclass
class Instance:
    """One users server: a stub that calls it, and its store."""

    stub: UsersStub
    store: UsersStore

    async def jwks(self) -> str:
        return (await self.stub.GetJwks(users_pb2.GetJwksRequest())).jwks_json

    async def published_kids(self) -> list[str]:
        return [key["kid"] for key in json.loads(await self.jwks())["keys"]]


def database_flags(db: Location) -> list[str]:
    """The flags that point the keys command at the users database db."""
    if isinstance(db, Path):
        assert db.name == "users.db", db
        return ["--data-dir", str(db.parent)]
    return ["--database-url", db]


@asynccontextmanager
async def users_server(
    db: Location, clock: Clock, *, ttl_s: int = TTL, params: ScryptParams = FAST
) -> AsyncIterator[Instance]:
    """A users service on the database at db, reading time from clock."""
    async with await UsersStore.open(db, clock=clock) as store:
        tokens = TokenIssuer(store.keys, TokenSettings(ISSUER, AUDIENCE, ttl_s), clock=clock)
        servicer = UserServicer(store, PasswordHasher(params), tokens)
        add = users_pb2_grpc.add_UserServiceServicer_to_server
        async with InProcessServer((add, servicer)) as server:
            yield Instance(users_pb2_grpc.UserServiceStub(server.channel), store)


@dataclass
class Users:
    """A users server on its database, with its clock."""

    server: Instance
    db: Location
    clock: Clock

    @property
    def stub(self) -> UsersStub:
        return self.server.stub

    async def stored_rows(self) -> dict[str, int]:
        return {table: await count_rows(self.db, table) for table in TABLES}


@asynccontextmanager
async def users_on(db: Location) -> AsyncIterator[Users]:
    clock = Clock()
    async with users_server(db, clock) as server:
        yield Users(server, db, clock)


@pytest.fixture(autouse=True)
def no_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags' default comes from DATABASE_URL: none from the environment the tests run
    in (a test that wants one sets it)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture
async def users(locate: Locate) -> AsyncIterator[Users]:
    """A users server on the test's engine."""
    async with users_on(locate("users")) as users:
        yield users


@pytest.fixture
async def sqlite_users(tmp_path: Path) -> AsyncIterator[Users]:
    """A users server on a SQLite file alone in its data directory, for what only a file
    has: its mode, its bytes."""
    async with users_on(database_path(tmp_path / "data", "users")) as users:
        yield users


@pytest.fixture
def kdf_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(n, r, p) of every scrypt run from now on."""
    runs: list[tuple[int, int, int]] = []
    real = hashlib.scrypt

    def counted(password: bytes, *, salt: bytes, n: int, r: int, p: int, **kw: Any) -> bytes:
        runs.append((n, r, p))
        return real(password, salt=salt, n=n, r=r, p=p, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    return runs


def verify(token: str, jwks: str) -> Any:
    return verify_token(token, jwks, issuer=ISSUER, audience=AUDIENCE)


# -- accounts -----------------------------------------------------------------------------


async def test_create_then_get_returns_the_user(users: Users) -> None:
    user = await users.stub.CreateUser(create_request(email="  Ada@Example.COM "))
    assert user.user_id.startswith("u-")
    assert (user.email, user.display_name) == ("ada@example.com", "Ada Lovelace")
    assert user.create_time.ToDatetime(tzinfo=UTC) == START
    fetched = await users.stub.GetUser(users_pb2.GetUserRequest(user_id=user.user_id))
    assert fetched == user


async def test_get_user_names_the_user_id(users: Users) -> None:
    empty = await rpc_error(users.stub.GetUser(users_pb2.GetUserRequest()))
    unknown = await rpc_error(users.stub.GetUser(users_pb2.GetUserRequest(user_id="u-nope")))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert empty.details() == "user_id must not be empty"
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert unknown.details() == "user_id 'u-nope': no such user"


@pytest.mark.parametrize(
    "email", ["a.b+tag@mail.example.co.uk", "o'hara@example.com", "x_1@ex-ample.org"]
)
async def test_usual_email_forms_are_accepted(users: Users, email: str) -> None:
    user = await users.stub.CreateUser(create_request(email=email.upper()))
    assert user.email == email


NOT_AN_EMAIL = "is not an email address: use the form name@example.com"
INVALID_CREATES = {
    "email must not be empty": create_request(email=""),
    "email must not be empty ": create_request(email="   "),
    f"email 'ada' {NOT_AN_EMAIL}": create_request(email="ada"),
    f"email 'ada@localhost' {NOT_AN_EMAIL}": create_request(email="ada@localhost"),
    f"email 'ada@@example.com' {NOT_AN_EMAIL}": create_request(email="ada@@example.com"),
    f"email 'a da@example.com' {NOT_AN_EMAIL}": create_request(email="a da@example.com"),
    f"email 'ada@-example.com' {NOT_AN_EMAIL}": create_request(email="ada@-example.com"),
    f"email 'ada@example..com' {NOT_AN_EMAIL}": create_request(email="ada@example..com"),
    f"email 'adä@example.com' {NOT_AN_EMAIL}": create_request(email="adä@example.com"),
    "email has 255 characters; the most is 254": create_request(email="a" * 243 + "@example.com"),
    "display_name must not be empty": create_request(display_name=""),
    "display_name must not be empty ": create_request(display_name=" \t "),
    "display_name has 101 characters; the most is 100": create_request(display_name="A" * 101),
    "display_name must not contain control characters": create_request(display_name="Ada\x1b"),
    "password has 0 characters; the least is 8": create_request(password=""),
    "password has 7 characters; the least is 8": create_request(password="seven77"),
    "password has 257 characters; the most is 256": create_request(password="p" * 257),
    "idempotency_key has 256 characters": create_request(idempotency_key="k" * 256),
}


@pytest.mark.parametrize("message", INVALID_CREATES)
async def test_invalid_create_names_its_field_and_stores_nothing(
    users: Users, message: str, kdf_runs: list[tuple[int, int, int]]
) -> None:
    error = await rpc_error(users.stub.CreateUser(INVALID_CREATES[message]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message.strip() in (error.details() or "")
    assert await users.stored_rows() == NOTHING_STORED
    assert kdf_runs == []  # refused before the expensive part


async def test_the_longest_password_and_email_are_accepted(users: Users) -> None:
    email = "a" * 242 + "@example.com"
    user = await users.stub.CreateUser(create_request(email=email, password="p" * 256))
    assert user.email == email
    login = await users.stub.Login(login_request(email, "p" * 256))
    assert login.user_id == user.user_id


@pytest.mark.parametrize("again", ["ada@example.com", "ADA@Example.COM", " Ada@example.com "])
async def test_a_taken_email_is_already_exists_in_any_case(users: Users, again: str) -> None:
    await users.stub.CreateUser(create_request())
    error = await rpc_error(
        users.stub.CreateUser(create_request(email=again, display_name="Another Ada"))
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details() == "email 'ada@example.com' belongs to another user"
    assert await users.stored_rows() == {"users": 1, "idempotent_requests": 0}


async def test_create_with_a_used_key_returns_the_first_user_without_hashing_again(
    users: Users, kdf_runs: list[tuple[int, int, int]]
) -> None:
    request = create_request(idempotency_key="signup-1")
    first = await users.stub.CreateUser(request)
    again = await users.stub.CreateUser(request)
    assert again == first
    assert len(kdf_runs) == 1
    assert await users.stored_rows() == dict.fromkeys(TABLES, 1)


@pytest.mark.parametrize(
    "other",
    [
        create_request(email="grace@example.com", idempotency_key="signup-1"),
        create_request(display_name="Countess", idempotency_key="signup-1"),
        create_request(password="another password", idempotency_key="signup-1"),
    ],
)
async def test_reusing_a_key_with_another_request_is_already_exists(
    users: Users, other: users_pb2.CreateUserRequest
) -> None:
    await users.stub.CreateUser(create_request(idempotency_key="signup-1"))
    error = await rpc_error(users.stub.CreateUser(other))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'signup-1'" in (error.details() or "")
    assert await users.stored_rows() == dict.fromkeys(TABLES, 1)


async def test_without_a_key_each_create_is_new(users: Users) -> None:
    ada = await users.stub.CreateUser(create_request())
    grace = await users.stub.CreateUser(create_request(email="grace@example.com"))
    assert ada.user_id != grace.user_id
    assert await users.stored_rows() == {"users": 2, "idempotent_requests": 0}


@asynccontextmanager
async def two_instances(db: Location, clock: Clock) -> AsyncIterator[tuple[Instance, Instance]]:
    """Two users servers, each with its own connection to one database."""
    async with users_server(db, clock) as one, users_server(db, clock) as two:
        yield one, two


async def test_concurrent_duplicate_creates_on_two_instances_make_one_user(
    locate: Locate,
) -> None:
    db = locate("users")
    request = create_request(idempotency_key="signup-1")
    async with two_instances(db, Clock()) as servers:
        responses = await asyncio.gather(
            *(servers[i % 2].stub.CreateUser(request) for i in range(10))
        )
    assert len({r.SerializeToString() for r in responses}) == 1
    assert {table: await count_rows(db, table) for table in TABLES} == dict.fromkeys(TABLES, 1)


async def test_concurrent_creates_of_one_email_on_two_instances_make_one_user(
    locate: Locate,
) -> None:
    db = locate("users")
    async with two_instances(db, Clock()) as servers:
        results = await asyncio.gather(
            *(
                servers[i % 2].stub.CreateUser(
                    create_request(email="ADA@example.com" if i % 3 else "ada@example.com")
                )
                for i in range(10)
            ),
            return_exceptions=True,
        )
    created = [r for r in results if isinstance(r, users_pb2.User)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 9
    assert {e.code() for e in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    assert await count_rows(db, "users") == 1


# -- passwords ----------------------------------------------------------------------------


async def test_the_password_is_stored_only_as_a_salted_scrypt_hash(users: Users) -> None:
    ada = await users.stub.CreateUser(create_request(idempotency_key="k"))
    await users.stub.CreateUser(create_request(email="grace@example.com"))
    async with await open_database(users.db) as database:
        rows = await database.fetch_all(
            "SELECT * FROM users ORDER BY user_id = ? DESC", (ada.user_id,)
        )
        ledger = await database.fetch_all("SELECT * FROM idempotent_requests")
    hashes = [row["password_hash"] for row in rows]
    assert all(h.startswith("$scrypt$ln=10,r=8,p=1$") for h in hashes)
    assert hashes[0] != hashes[1]  # same password, different salts
    for row in [*rows, *ledger]:
        for value in tuple(row):
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            assert PASSWORD not in text


async def test_the_password_is_in_no_byte_of_the_sqlite_files(sqlite_users: Users) -> None:
    await sqlite_users.stub.CreateUser(create_request(idempotency_key="k"))
    await sqlite_users.stub.CreateUser(create_request(email="grace@example.com"))
    assert isinstance(sqlite_users.db, Path)
    files = list(sqlite_users.db.parent.iterdir())
    assert {f.name for f in files} >= {"users.db", "users.db-wal"}
    for file in files:  # the database and its WAL, byte for byte
        assert PASSWORD.encode() not in file.read_bytes()


async def test_the_database_file_is_readable_by_its_owner_only(sqlite_users: Users) -> None:
    await sqlite_users.stub.CreateUser(create_request())
    assert isinstance(sqlite_users.db, Path)
    files = list(sqlite_users.db.parent.iterdir())
    assert {f.name for f in files} >= {"users.db", "users.db-wal"}
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}


async def test_no_secret_and_no_email_is_logged_even_at_debug(
    users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong, short = "Tr0ub4dor&3-not-it", "sh0rt!x"
    user = await users.stub.CreateUser(create_request(idempotency_key="k"))
    await users.stub.CreateUser(create_request(idempotency_key="k"))
    await rpc_error(users.stub.CreateUser(create_request(email="x@example.com", password=short)))
    token = (await users.stub.Login(login_request())).access_token
    await rpc_error(users.stub.Login(login_request(password=wrong)))
    await rpc_error(users.stub.Login(login_request(email="nobody@example.com")))
    await users.server.store.keys.rotate()
    async with await open_database(users.db) as database:
        hashes = await database.fetch_all("SELECT password_hash FROM users")
        keys = await database.fetch_all("SELECT private_key_pem FROM signing_keys")
    stored = [str(row[0]) for row in [*hashes, *keys]]
    assert len(stored) == 3 and "PRIVATE KEY" in stored[-1]
    logged = "\n".join([record.getMessage() for record in caplog.records] + [caplog.text])
    assert f"created user {user.user_id}" in logged and "login refused" in logged
    for secret in (PASSWORD, wrong, short, token, *stored, "ada@example.com", "nobody@"):
        assert secret not in logged


async def test_login_rehashes_a_password_hashed_with_older_parameters(locate: Locate) -> None:
    db, clock = locate("users"), Clock()
    stronger = ScryptParams(log2_n=11, r=8, p=2)
    async with users_server(db, clock) as old, users_server(db, clock, params=stronger) as new:
        user = await old.stub.CreateUser(create_request())
        assert (await new.stub.Login(login_request())).user_id == user.user_id
        credentials = await new.store.credentials("ada@example.com")
        assert credentials is not None
        assert credentials.password_hash.startswith("$scrypt$ln=11,r=8,p=2$")
        assert (await new.stub.Login(login_request())).user_id == user.user_id
        error = await rpc_error(new.stub.Login(login_request(password="wrong password")))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# -- login and tokens ---------------------------------------------------------------------


async def test_login_returns_a_jwt_that_verifies_against_the_jwks(users: Users) -> None:
    user = await users.stub.CreateUser(create_request())
    login = await users.stub.Login(login_request(email="ADA@example.com"))
    assert (login.token_type, login.expires_in, login.user_id) == ("Bearer", TTL, user.user_id)

    jwks = await users.server.jwks()
    key_set = jwt.PyJWKSet.from_json(jwks)
    [published] = json.loads(jwks)["keys"]
    assert {name: published[name] for name in ("kty", "crv", "use", "alg")} == {
        "kty": "EC",
        "crv": "P-256",
        "use": "sig",
        "alg": "ES256",
    }
    assert set(published) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    header = jwt.get_unverified_header(login.access_token)
    assert (header["alg"], header["kid"]) == ("ES256", published["kid"])

    verified = verify(login.access_token, jwks)
    assert verified.user_id == user.user_id and verified.kid == published["kid"]
    assert (verified.issuer, verified.audience) == (ISSUER, AUDIENCE)
    assert verified.issued_at == START
    assert verified.expires_at == START + timedelta(seconds=TTL)
    claims = jwt.decode(  # plain PyJWT with the published key agrees
        login.access_token,
        key_set[published["kid"]],
        algorithms=["ES256"],
        audience=AUDIENCE,
        issuer=ISSUER,
    )
    assert set(claims) == {"sub", "iss", "aud", "iat", "exp", "jti"}
    assert claims["exp"] - claims["iat"] == TTL
    again = await users.stub.Login(login_request())
    assert verify(again.access_token, jwks).token_id != verified.token_id


async def test_a_wrong_password_and_an_unknown_email_get_the_same_answer_and_work(
    users: Users, kdf_runs: list[tuple[int, int, int]]
) -> None:
    await users.stub.CreateUser(create_request())
    kdf_runs.clear()
    wrong = await rpc_error(users.stub.Login(login_request(password="correct horse battery!")))
    wrong_runs = kdf_runs[:]
    unknown = await rpc_error(users.stub.Login(login_request(email="grace@example.com")))
    assert wrong.code() == unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.details() == unknown.details() == WRONG_CREDENTIALS
    assert wrong_runs == [(1024, 8, 1)]
    assert kdf_runs == [(1024, 8, 1), (1024, 8, 1)]


INVALID_LOGINS = {
    "email must not be empty": login_request(email=" "),
    "password must not be empty": login_request(password=""),
    "password has 257 characters; the most is 256": login_request(password="p" * 257),
    "email has 255 characters; the most is 254": login_request(email="a" * 243 + "@example.com"),
}


@pytest.mark.parametrize("message", INVALID_LOGINS)
async def test_invalid_login_names_its_field(
    users: Users, message: str, kdf_runs: list[tuple[int, int, int]]
) -> None:
    error = await rpc_error(users.stub.Login(INVALID_LOGINS[message]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == message
    assert kdf_runs == []


def _forged(claims: dict[str, Any], kid: str) -> str:
    """An HS256 token naming our key: a token must not get to choose its algorithm."""
    return jwt.encode(claims, "not-our-key-not-our-key-not-ours", "HS256", headers={"kid": kid})


async def test_verify_token_refuses_what_it_must(users: Users, locate: Locate) -> None:
    await users.stub.CreateUser(create_request())
    token = (await users.stub.Login(login_request())).access_token
    jwks = await users.server.jwks()
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    head, body, signature = token.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    users.clock.advance(-2 * TTL)
    expired = (await users.stub.Login(login_request())).access_token
    async with users_server(locate("other-users"), Clock()) as elsewhere:
        await elsewhere.stub.CreateUser(create_request())
        foreign = (await elsewhere.stub.Login(login_request())).access_token

    cases: dict[str, Callable[[], Any]] = {
        "does not verify: Signature verification failed": lambda: verify(
            f"{head}.{body}.{flipped}", jwks
        ),
        "Audience doesn't match": lambda: verify_token(
            token, jwks, issuer=ISSUER, audience="another-audience"
        ),
        "Invalid issuer": lambda: verify_token(
            token, jwks, issuer="someone-else", audience=AUDIENCE
        ),
        "Signature has expired": lambda: verify(expired, jwks),
        "no key": lambda: verify(foreign, jwks),
        "The specified alg value is not allowed": lambda: verify(_forged(claims, kid), jwks),
        "the token is malformed": lambda: verify("not.a.token", jwks),
        "not a usable JWK Set": lambda: verify(token, '{"keys": []}'),
    }
    for reason, attempt in cases.items():
        with pytest.raises(InvalidToken, match=reason):
            attempt()


# -- signing keys -------------------------------------------------------------------------


async def test_rotation_keeps_old_tokens_verifying_until_the_old_key_retires(
    locate: Locate,
) -> None:
    db, clock = locate("users"), Clock()
    rotate = ["rotate", *database_flags(db)]
    async with two_instances(db, clock) as (one, two):
        await one.stub.CreateUser(create_request())
        old_token = (await one.stub.Login(login_request())).access_token
        [old_kid] = await one.published_kids()

        # Another process rotates; both instances follow without a restart.
        lines = await keys_command.run(rotate, clock=clock)
        new_token = (await two.stub.Login(login_request())).access_token
        new_kid = jwt.get_unverified_header(new_token)["kid"]
        assert new_kid != old_kid
        assert (
            jwt.get_unverified_header((await one.stub.Login(login_request())).access_token)["kid"]
            == new_kid
        )
        retire = START + timedelta(seconds=TTL)
        assert lines == [
            f"{new_kid} signs new tokens from now on",
            f"{old_kid} verifies until {retire.isoformat()} (then retires)",
        ]
        jwks = await one.jwks()
        assert jwks == await two.jwks()
        assert await one.published_kids() == [new_kid, old_kid]
        assert verify(old_token, jwks).kid == old_kid
        assert verify(new_token, jwks).kid == new_kid

        clock.advance(TTL - 1)  # the last second of old tokens
        assert await two.published_kids() == [new_kid, old_kid]
        clock.advance(1)  # every token of the old key has expired
        assert await one.published_kids() == await two.published_kids() == [new_kid]
        with pytest.raises(InvalidToken, match=f"no key '{old_kid}'"):
            verify(old_token, await one.jwks())
        assert verify(new_token, await one.jwks()).kid == new_kid

        # The next rotation deletes the retired key, private part and all.
        await keys_command.run(rotate, clock=clock)
    async with await open_database(db) as database:
        kids = [row["kid"] for row in await database.fetch_all("SELECT kid FROM signing_keys")]
    assert old_kid not in kids and new_kid in kids and len(kids) == 2


async def test_a_key_keeps_published_for_the_longest_lifetime_it_signed_with(
    locate: Locate,
) -> None:
    db, clock = locate("users"), Clock()
    async with (
        users_server(db, clock, ttl_s=TTL) as short,
        users_server(db, clock, ttl_s=2 * TTL) as long,
    ):
        await short.stub.CreateUser(create_request())
        await short.stub.Login(login_request())
        long_lived = await long.stub.Login(login_request())
        assert long_lived.expires_in == 2 * TTL
        rotation = await short.store.keys.rotate()
        assert rotation.replaced is not None
        assert rotation.replaced.retire_time == START + timedelta(seconds=2 * TTL)
        clock.advance(TTL)
        assert len(await short.published_kids()) == 2  # the long-lived token is still valid
        clock.advance(TTL)
        assert await short.published_kids() == [rotation.signing.kid]


async def test_a_key_that_signed_nothing_retires_when_replaced(locate: Locate) -> None:
    clock = Clock()
    async with await UsersStore.open(locate("users"), clock=clock) as store:
        first = await store.keys.ensure()
        rotation = await store.keys.rotate()
        assert rotation.replaced is not None and rotation.replaced.kid == first
        assert rotation.deleted == (first,)
        assert [key.kid for key in await store.keys.published()] == [rotation.signing.kid]
        assert [key.kid for key in await store.keys.ring()] == [rotation.signing.kid]


async def test_instances_starting_together_create_one_signing_key(locate: Locate) -> None:
    db, clock = locate("users"), Clock()
    async with AsyncExitStack() as stack:
        stores = await asyncio.gather(*(UsersStore.open(db, clock=clock) for _ in range(5)))
        for store in stores:
            await stack.enter_async_context(store)
        kids = {await store.keys.ensure() for store in stores}
    assert len(kids) == 1
    assert await count_rows(db, "signing_keys") == 1

    async with two_instances(db, clock) as (one, two):  # and they publish the same set
        assert await one.jwks() == await two.jwks()
        assert await one.published_kids() == list(kids)


async def test_keys_list_tells_which_key_signs_and_when_the_others_retire(
    locate: Locate,
) -> None:
    db, clock = locate("users"), Clock()
    async with users_server(db, clock) as server:
        await server.stub.CreateUser(create_request())
        await server.stub.Login(login_request())
        old = await server.store.keys.ensure()
        new = (await server.store.keys.rotate()).signing.kid
    lines = await keys_command.run(["list", *database_flags(db)], clock=clock)
    retire = (START + timedelta(seconds=TTL)).isoformat()
    assert lines == [
        f"{old} verifies until {retire} (then retires)",
        f"{new} signs (since {START.isoformat()})",
    ]


async def test_the_keys_command_finds_the_database_as_the_service_does(
    locate: Locate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data-dir`'s users.db; or DATABASE_URL's database, which wins over --data-dir."""
    db, clock = locate("users"), Clock()
    async with await UsersStore.open(db, clock=clock) as store:
        kid = await store.keys.ensure()
    if isinstance(db, Path):
        data_dir = db.parent
    else:
        monkeypatch.setenv("DATABASE_URL", db)
        data_dir = tmp_path / "unused"
    lines = await keys_command.run(["list", "--data-dir", str(data_dir)], clock=clock)
    assert lines == [f"{kid} signs (since {START.isoformat()})"]
    assert (data_dir / "users.db").exists() == isinstance(db, Path)


def test_the_keys_command_refuses_a_database_url_that_is_not_postgres(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        keys_command.parse_args(["list", "--database-url", "sqlite:///users.db"])
    assert exited.value.code == 2
    assert "--database-url: must be a postgresql:// URL" in capsys.readouterr().err


def test_token_flags_have_their_defaults_and_refuse_bad_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args("users", [], flags)
    assert (args.token_ttl, args.issuer, args.audience) == (3600, "foodmesh-users", "foodmesh")
    args = parse_args("users", ["--token-ttl", "60", "--issuer", "i", "--audience", "a"], flags)
    assert (args.token_ttl, args.issuer, args.audience) == (60, "i", "a")
    refusals = {
        "--token-ttl: must be >= 1 second, got 0": ["--token-ttl", "0"],
        "--token-ttl: must be whole seconds, got '1.5'": ["--token-ttl", "1.5"],
        "--issuer: must not be empty": ["--issuer", " "],
    }
    for message, bad in refusals.items():
        with pytest.raises(SystemExit) as exited:
            parse_args("users", bad, flags)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
