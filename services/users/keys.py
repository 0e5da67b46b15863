"""`python -m services.users.keys`: the operator's commands for the token signing keys in the
users database (see keystore.py for the rules): `<data-dir>/users.db`, or the Postgres
database of `--database-url` / DATABASE_URL, found as the users service finds it.

    python -m services.users.keys rotate --data-dir D   # a new key signs from now on
    python -m services.users.keys list --data-dir D     # the keys, and when each retires
    python -m services.users.keys rotate --database-url postgresql://users:...@host/users

It works on the database directly, beside running instances (they pick a rotation up at their
next Login), and on one no instance has opened yet (it creates the schema, with a first key).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime

from services.cli import add_storage_flags, database_location
from services.users.keystore import KeyInfo
from services.users.store import UsersStore
from services.users.tokens import Clock, utc_now

SERVICE = "users"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.users.keys",
        description="Manage the keys that sign the users service's access tokens.",
    )
    parser.add_argument(
        "command",
        choices=("rotate", "list"),
        help="rotate: add a key that signs from now on; list: show the keys",
    )
    add_storage_flags(parser, "the users service's")
    return parser.parse_args(argv)


async def run(argv: Sequence[str] | None, *, clock: Clock = utc_now) -> list[str]:
    """Carry out the command; the lines it reports."""
    args = parse_args(argv)
    async with await UsersStore.open(database_location(args, SERVICE), clock=clock) as store:
        if args.command == "list":
            now = clock()
            return [describe(key, now) for key in await store.keys.ring()]
        rotation = await store.keys.rotate()
    lines = [f"{rotation.signing.kid} signs new tokens from now on"]
    if rotation.replaced is not None:
        lines.append(describe(rotation.replaced, rotation.signing.create_time))
    lines.extend(f"{kid} deleted: every token it signed has expired" for kid in rotation.deleted)
    return lines


def describe(key: KeyInfo, now: datetime) -> str:
    """One line about a key: what it does at `now`."""
    if key.retire_time is None:
        return f"{key.kid} signs (since {_time(key.create_time)})"
    if key.published_at(now):
        return f"{key.kid} verifies until {_time(key.retire_time)} (then retires)"
    return f"{key.kid} retired at {_time(key.retire_time)} (no longer published)"


def _time(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def main(argv: Sequence[str] | None = None) -> int:
    for line in asyncio.run(run(argv)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
