"""Users, their password hashes, the token signing keys and the idempotency ledger, kept in
the service's database (a SQLite file, or Postgres) and shared by every users instance.

CreateUser is one write transaction holding the database's write lock (meshkit.storage.database):
the ledger lookup, the check that the email is free, the insert and the ledger record. Two
concurrent duplicates, in one process or in two sharing the database, therefore never both
create a user, and two different requests for one email never both find it free (the UNIQUE
email column is the last line). A refusal raised in the transaction rolls it back and leaves
no ledger record. Emails arrive normalized (lower case, see servicer.py), so the unique column
compares them case-insensitively.

A repeated key is also looked up before the password is hashed (`user_for_key`), so a retry
costs no KDF run; the lookup inside the transaction still decides, for duplicates that arrive
together.

The database holds password hashes and the private signing keys (keystore.py), so the store
makes a SQLite file, and the WAL files SQLite creates beside it, readable by their owner only
(a Postgres database is its role's: no other role may connect).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Self

import grpc
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from foodmesh.users.v1 import users_pb2
from meshkit.storage import idempotency
from meshkit.storage.database import Database, DatabaseStore, Row, is_database_url, open_database
from meshkit.storage.idempotency import IdempotencyKey, IdempotencyLedger
from meshkit.storage.schema import Schema
from services.refusals import Refusal
from services.users import keystore
from services.users.keystore import SigningKeys
from services.users.tokens import Clock, utc_now

SERVICE = "foodmesh.users.v1.UserService"
CREATE = IdempotencyLedger(f"{SERVICE}/CreateUser")


@dataclass(frozen=True, slots=True)
class NewUser:
    """A valid, normalized CreateUser request, its password already hashed."""

    email: str
    display_name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class StoredUser:
    """A user as stored, with the id and time the store gave it."""

    user_id: str
    email: str
    display_name: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Credentials:
    """What Login checks a password against."""

    user: StoredUser
    password_hash: str


@dataclass(frozen=True, slots=True)
class Created:
    """What CreateUser answers; created is False when a used key was answered."""

    user: users_pb2.User
    created: bool


SCHEMA = (
    Schema.of(
        "users",
        sa.Table(
            "users",
            sa.MetaData(),
            sa.Column("user_id", sa.Text, primary_key=True),
            sa.Column(
                "email",
                sa.Text,
                sa.CheckConstraint("email = lower(email)"),
                nullable=False,
                unique=True,
            ),
            sa.Column("display_name", sa.Text, nullable=False),
            sa.Column("password_hash", sa.Text, nullable=False),
            sa.Column("create_time", sa.Text, nullable=False),
        ),
    ),
    keystore.SCHEMA,
    idempotency.SCHEMA,
)

_COLUMNS = "user_id, email, display_name, create_time"


class UsersStore(DatabaseStore):
    """Creates and reads users; `keys` is the token signing key ring in the same database."""

    def __init__(self, database: Database, clock: Clock = utc_now) -> None:
        super().__init__(database)
        self._clock = clock
        self.keys = SigningKeys(database, clock)

    @classmethod
    async def open(cls, location: Path | str, *, clock: Clock = utc_now) -> Self:
        """Open (or create) the users database at `location` (a SQLite file's path, made
        owner-only, or a `postgresql://` URL), with a signing key (created by whichever
        instance gets there first); clock gives the times stored."""
        if not is_database_url(location):
            _owner_only(Path(location))
        store = cls(await open_database(location, schema=SCHEMA), clock)
        try:
            await store.keys.ensure()
        except BaseException:
            await store.close()
            raise
        return store

    async def user_for_key(self, key: IdempotencyKey | None) -> users_pb2.User | None:
        """The user an earlier CreateUser with this key created, or None (also for no key);
        IdempotencyConflict when the key came with another request."""
        if key is None:
            return None
        async with self._database.snapshot() as transaction:
            return await CREATE.recall(transaction, key, users_pb2.User)

    async def create(self, new: NewUser, key: IdempotencyKey | None) -> Created:
        """Store a new user, or, for a used key with the same request, return the first
        user. Refuses with ALREADY_EXISTS when the email is taken; IdempotencyConflict for
        a used key with another request."""
        async with self._database.transaction() as transaction:
            earlier = await CREATE.recall(transaction, key, users_pb2.User)
            if earlier is not None:
                return Created(earlier, created=False)
            taken = await transaction.fetch_one("SELECT 1 FROM users WHERE email = ?", (new.email,))
            if taken is not None:
                raise Refusal(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"email {new.email!r} belongs to another user",
                )
            user = StoredUser(f"u-{uuid.uuid4()}", new.email, new.display_name, self._clock())
            await transaction.execute(
                "INSERT INTO users (user_id, email, display_name, password_hash, create_time)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    user.user_id,
                    user.email,
                    user.display_name,
                    new.password_hash,
                    user.create_time.isoformat(timespec="microseconds"),
                ),
            )
            response = user_message(user)
            await CREATE.remember(transaction, key, response)
        return Created(response, created=True)

    async def get(self, user_id: str) -> StoredUser | None:
        """The user with this id, or None."""
        row = await self._database.fetch_one(
            f"SELECT {_COLUMNS} FROM users WHERE user_id = ?", (user_id,)
        )
        return None if row is None else _user_from_row(row)

    async def credentials(self, email: str) -> Credentials | None:
        """The user with this (normalized) email and its password hash, or None."""
        row = await self._database.fetch_one(
            f"SELECT {_COLUMNS}, password_hash FROM users WHERE email = ?", (email,)
        )
        return None if row is None else Credentials(_user_from_row(row), row["password_hash"])

    async def replace_password_hash(self, user_id: str, old: str, new: str) -> bool:
        """Store a rehash of the same password, unless the hash changed meanwhile; whether
        it was stored."""
        async with self._database.transaction() as transaction:
            changed = await transaction.execute(
                "UPDATE users SET password_hash = ? WHERE user_id = ? AND password_hash = ?",
                (new, user_id, old),
            )
        return changed == 1


def user_message(user: StoredUser) -> users_pb2.User:
    """The wire form of a stored user."""
    create_time = Timestamp()
    create_time.FromDatetime(user.create_time)
    return users_pb2.User(
        user_id=user.user_id,
        email=user.email,
        display_name=user.display_name,
        create_time=create_time,
    )


def _user_from_row(row: Row) -> StoredUser:
    return StoredUser(
        user_id=row["user_id"],
        email=row["email"],
        display_name=row["display_name"],
        create_time=datetime.fromisoformat(row["create_time"]),
    )


def _owner_only(path: Path) -> None:
    """Create the file (if new) with mode 0600 before SQLite opens it, so that SQLite gives
    its -wal and -shm files the same mode; tighten the mode of files that exist."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        if file.exists():
            file.chmod(0o600)
