"""Idempotency keys for mutating RPCs, one convention for every service.

A mutating request carries an `idempotency_key` chosen by the caller. The service keeps the
key with a fingerprint of the request and the response it gave, in the same transaction as
the request's effect:

- the same key with the same request returns the first response and changes nothing;
- the same key with another request is refused (IdempotencyConflict -> ALREADY_EXISTS);
- an empty key means no deduplication.

Because the lookup, the effect and the record share one write transaction, which holds the
database's write lock from its first read (meshkit.storage.database), two concurrent
duplicates, in one process or in two, can never both find the key absent: the second waits
for the first to commit, then finds its response. Keys are scoped by method, so one key used
for a capture and a refund of the same payment names two requests, as a saga's step keys do.

The fingerprint is SHA-256 over the request's deterministic protobuf serialization with the
key field cleared, so a retry matches its original byte for byte, field order aside.

    ledger = IdempotencyLedger("foodmesh.payments.v1.PaymentService/CapturePayment")
    async with database.transaction() as transaction:
        key = ledger.key_of(request)
        earlier = await ledger.recall(transaction, key, payments_pb2.Payment)
        if earlier is not None:
            return earlier
        payment = ...  # the effect, in this transaction
        await ledger.remember(transaction, key, payment)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message

from meshkit.storage.database import Queries, SqlTransaction
from meshkit.storage.schema import Schema

MAX_KEY_LENGTH = 255
KEY_FIELD = "idempotency_key"

SCHEMA = Schema.of(
    "idempotency",
    sa.Table(
        "idempotent_requests",
        sa.MetaData(),
        sa.Column("method", sa.Text, primary_key=True),
        sa.Column("idempotency_key", sa.Text, primary_key=True),
        sa.Column("request_fingerprint", sa.Text, nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=False),
    ),
)
"""The ledger's table; add it to the schema of a store whose requests it deduplicates."""

Response = TypeVar("Response", bound=Message)


class IdempotencyConflict(Exception):
    """The idempotency key was already used with a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"idempotency_key {key!r} was already used with a different request: a retry must "
            "repeat the request exactly, and a new request needs a new key"
        )
        self.key = key


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A caller's key with the fingerprint of the request it came with."""

    key: str
    request_fingerprint: str


def key_problem(key: str) -> str | None:
    """What is wrong with an idempotency key on its face (naming the field), or None."""
    if len(key) > MAX_KEY_LENGTH:
        return f"{KEY_FIELD} has {len(key)} characters; the most is {MAX_KEY_LENGTH}"
    return None


def request_fingerprint(request: Message, key_field: str = KEY_FIELD) -> str:
    """SHA-256 of the request as sent, without its key."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField(key_field)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


class IdempotencyLedger:
    """The keys one method has seen, with the responses it gave them."""

    def __init__(self, method: str, key_field: str = KEY_FIELD) -> None:
        self.method = method
        self._key_field = key_field

    def key_of(self, request: Message) -> IdempotencyKey | None:
        """The request's key and fingerprint; None when it carries no key."""
        key = getattr(request, self._key_field)
        if not key:
            return None
        return IdempotencyKey(key, request_fingerprint(request, self._key_field))

    async def recall(
        self,
        queries: Queries,
        key: IdempotencyKey | None,
        response_type: type[Response],
    ) -> Response | None:
        """The response an earlier request with this key gave, or None (also for no key);
        IdempotencyConflict when the key came with another request. In the transaction that
        acts on the answer; on the database itself only for a look ahead of that."""
        if key is None:
            return None
        row = await queries.fetch_one(
            "SELECT request_fingerprint, response FROM idempotent_requests"
            " WHERE method = ? AND idempotency_key = ?",
            (self.method, key.key),
        )
        if row is None:
            return None
        if row["request_fingerprint"] != key.request_fingerprint:
            raise IdempotencyConflict(key.key)
        return response_type.FromString(row["response"])

    async def remember(
        self, transaction: SqlTransaction, key: IdempotencyKey | None, response: Message
    ) -> None:
        """Keep the response this key's request got (nothing for no key)."""
        if key is None:
            return
        await transaction.execute(
            "INSERT INTO idempotent_requests"
            " (method, idempotency_key, request_fingerprint, response) VALUES (?, ?, ?, ?)",
            (self.method, key.key, key.request_fingerprint, response.SerializeToString()),
        )
