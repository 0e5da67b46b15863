"""`python -m services.users.keys`: the operator's commands for the token signing keys in
`<data-dir>/users.db` (see keystore.py for the rules).

    python -m services.users.keys rotate --data-dir D   # a new key signs from now on
    python -m services.users.keys list --data-dir D     # the keys, and when each retires

It works on the file directly, beside running instances (they pick a rotation up at their next
Login), and on a file no instance has opened yet (it creates it, with a first key).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from services.datadir import database_path, default_data_dir
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
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="directory of users.db, as given to the users service (default: %(default)s)",
    )
    return parser.parse_args(argv)


async def run(argv: Sequence[str] | None, *, clock: Clock = utc_now) -> list[str]:
    """Carry out the command; the lines it reports."""
    args = parse_args(argv)
    path = database_path(args.data_dir, SERVICE)
    async with await UsersStore.open(path, clock=clock) as store:
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
