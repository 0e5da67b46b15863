"""`python -m services.users`: one users instance, registered in Consul; its instances share
one database (`<data-dir>/users.db`, or the Postgres database of --database-url), and with it
the users, their password hashes and the token signing keys.

    python -m services.users --token-ttl 3600 --issuer foodmesh-users --audience foodmesh

The first instance to start on a new database creates the signing key. To rotate it, run

    python -m services.users.keys rotate --data-dir D      # or --database-url URL

while the instances serve: they sign with the new key from their next Login on, and publish
the old one (GetJwks) until every token it signed has expired. `python -m services.users.keys
list` (with the same flag) shows the keys and when each retires.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from foodmesh.users.v1 import users_pb2, users_pb2_grpc
from services.runtime import ServiceRuntime
from services.users.passwords import PasswordHasher
from services.users.servicer import UserServicer
from services.users.store import UsersStore
from services.users.tokens import TokenIssuer, TokenSettings

SERVICE = "users"
DEFAULTS = TokenSettings()
log = logging.getLogger(__name__)


def flags(parser: argparse.ArgumentParser) -> None:
    tokens = parser.add_argument_group("access tokens")
    tokens.add_argument(
        "--token-ttl",
        type=whole_seconds,
        default=DEFAULTS.ttl_s,
        metavar="SECONDS",
        help="lifetime of the access tokens Login returns (default: %(default)s)",
    )
    tokens.add_argument(
        "--issuer",
        type=claim_value,
        default=DEFAULTS.issuer,
        help="the tokens' iss claim, which verifiers check (default: %(default)s)",
    )
    tokens.add_argument(
        "--audience",
        type=claim_value,
        default=DEFAULTS.audience,
        help="the tokens' aud claim, which verifiers check (default: %(default)s)",
    )


def whole_seconds(text: str) -> int:
    """An argparse type: a whole number of seconds >= 1 (JWT times are whole seconds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole seconds, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 second, got {value}")
    return value


def claim_value(text: str) -> str:
    """An argparse type: a non-empty claim value."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


async def main(argv: list[str]) -> int:
    async with ServiceRuntime.started(SERVICE, argv, flags) as runtime:
        args = runtime.args
        store = await runtime.closing(UsersStore.open(runtime.database_location()))
        settings = TokenSettings(issuer=args.issuer, audience=args.audience, ttl_s=args.token_ttl)
        log.info(
            "signing tokens with key %s (iss %r, aud %r, %d s)",
            await store.keys.ensure(),
            settings.issuer,
            settings.audience,
            settings.ttl_s,
        )
        server = runtime.server()
        server.add_service(
            users_pb2.DESCRIPTOR.services_by_name["UserService"],
            users_pb2_grpc.add_UserServiceServicer_to_server,
            UserServicer(store, PasswordHasher(), TokenIssuer(store.keys, settings)),
        )
        return await server.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
