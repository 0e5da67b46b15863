"""The keys that sign access tokens (ES256: ECDSA on P-256), kept in the users database.

Every users instance opens the same database, so every instance signs with the same key and
publishes the same key set. The first instance to start creates the first key; the check and
the insert share one write transaction, so instances starting together create one key.

Rotation adds a key (`python -m services.users.keys rotate`, see keys.py). The newest key signs
from the moment its transaction commits: instances read the signing key at every Login, so they
follow a rotation made by another instance or by the command without a restart. An older key
stays published (GetJwks) until every token it signed has expired: its retirement time is when
the next key took over plus the longest token lifetime it signed with. Instances record that
lifetime on the key (`max_token_ttl_s`, raised before the first token with a longer one), so
instances with different --token-ttl flags still agree on the key set, and a key that never
signed a token retires the moment it is replaced. A rotation also deletes the keys retired by
then, private parts and all.

Tokens are stamped with a time read before the signing key (TokenIssuer does), so a token of
an old key expires no later than that key's retirement: the only slack is the few milliseconds
of a rotation's own transaction, and, when instances on Postgres run on several hosts, the
skew of those hosts' clocks (on SQLite they share the file, hence the host and its clock).

The private keys are stored unencrypted (PKCS#8 PEM): the database is the secret, which is why
the users store makes its SQLite file readable by its owner only (on Postgres, only the users
role may connect to its database). A key's id (kid) is its RFC 7638 JWK thumbprint, so it
names the key material itself and two keys can never share one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from meshkit.storage.database import Database, Row, SqlTransaction
from meshkit.storage.schema import BigInt, Schema
from services.users.tokens import ALGORITHM, Clock

SCHEMA = Schema.of(
    "signing_keys",
    sa.Table(
        "signing_keys",
        sa.MetaData(),
        sa.Column("sequence", BigInt, primary_key=True),
        sa.Column("kid", sa.Text, nullable=False, unique=True),
        sa.Column("private_key_pem", sa.Text, nullable=False),
        sa.Column("public_jwk", sa.Text, nullable=False),
        sa.Column("create_time", sa.Text, nullable=False),
        sa.Column(
            "max_token_ttl_s",
            BigInt,
            sa.CheckConstraint("max_token_ttl_s >= 0"),
            nullable=False,
            server_default="0",
        ),
    ),
)
"""The key ring's table; part of the users store's schema."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The key that signs new tokens."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key of the ring as operators and GetJwks see it: retire_time is None for the
    signing key (the newest), else when its last token expires."""

    kid: str
    create_time: datetime
    public_jwk: str
    retire_time: datetime | None

    @property
    def signing(self) -> bool:
        return self.retire_time is None

    def published_at(self, now: datetime) -> bool:
        """Whether the key is in the key set at `now`."""
        return self.retire_time is None or now < self.retire_time


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did: the key that signs now, the one it replaced (None when the ring
    was empty) and the kids of the retired keys it deleted (the replaced one among them when
    it never signed a token)."""

    signing: KeyInfo
    replaced: KeyInfo | None
    deleted: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key made for the ring, not yet stored."""

    kid: str
    private_key_pem: str
    public_jwk: str


def new_key() -> NewKey:
    """A fresh P-256 key with its public JWK and RFC 7638 thumbprint as kid."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    kid = thumbprint(jwk)
    public = {**jwk, "kid": kid, "use": "sig", "alg": ALGORITHM}
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NewKey(kid, pem.decode("ascii"), json.dumps(public, sort_keys=True))


def thumbprint(jwk: dict[str, object]) -> str:
    """RFC 7638: base64url (no padding) of SHA-256 over the required members of an EC key,
    in lexicographic order, without whitespace."""
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(required, separators=(",", ":")).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def jwks_json(keys: Sequence[KeyInfo]) -> str:
    """An RFC 7517 JWK Set of the keys' public parts, in the order given."""
    return json.dumps({"keys": [json.loads(key.public_jwk) for key in keys]}, sort_keys=True)


class SigningKeys:
    """The key ring in a users database (the store's connection; the store closes it)."""

    def __init__(self, database: Database, clock: Clock) -> None:
        self._database = database
        self._clock = clock
        self._parsed: dict[str, ec.EllipticCurvePrivateKey] = {}

    async def ensure(self) -> str:
        """The signing key's kid, creating the first key if the ring is empty."""
        async with self._database.transaction() as transaction:
            row = await self._newest(transaction)
        return str(row["kid"])

    async def rotate(self) -> Rotation:
        """Add a key that signs from now on, and delete the keys whose tokens have all
        expired by now."""
        made = new_key()
        async with self._database.transaction() as transaction:
            now = self._clock()
            await _insert(transaction, made, now)
            ring = await _ring(transaction)
            retired = tuple(key.kid for key in ring if not key.published_at(now))
            await transaction.execute_many(
                "DELETE FROM signing_keys WHERE kid = ?", [(kid,) for kid in retired]
            )
        return Rotation(ring[-1], ring[-2] if len(ring) > 1 else None, retired)

    async def signing_key(self, token_ttl_s: int) -> SigningKey:
        """The newest key, to sign tokens that live token_ttl_s seconds.

        When the key never signed tokens that long, the lifetime is recorded on it first, in
        the transaction that reads it: a rotation then either comes first (and this returns
        the new key) or sees the lifetime (and keeps this key published long enough)."""
        row = await self._database.fetch_one(_NEWEST)
        if row is None or row["max_token_ttl_s"] < token_ttl_s:
            async with self._database.transaction() as transaction:
                row = await self._newest(transaction)
                # Raise only (SQL both engines speak: SQLite's MAX(a, b) is Postgres's GREATEST).
                await transaction.execute(
                    "UPDATE signing_keys SET max_token_ttl_s = ?"
                    " WHERE kid = ? AND max_token_ttl_s < ?",
                    (token_ttl_s, row["kid"], token_ttl_s),
                )
        kid = str(row["kid"])
        private_key = self._parsed.get(kid)
        if private_key is None:
            loaded = serialization.load_pem_private_key(row["private_key_pem"].encode(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise TypeError(f"signing key {kid} is not an EC key")
            private_key = self._parsed[kid] = loaded
        return SigningKey(kid, private_key)

    async def ring(self) -> tuple[KeyInfo, ...]:
        """Every stored key, oldest first, with its retirement time."""
        async with self._database.snapshot() as transaction:
            return await _ring(transaction)

    async def published(self) -> tuple[KeyInfo, ...]:
        """The keys GetJwks publishes now: the signing key first, then older keys whose
        tokens may not all have expired yet, newest first."""
        now = self._clock()
        return tuple(key for key in reversed(await self.ring()) if key.published_at(now))

    async def _newest(self, transaction: SqlTransaction) -> Row:
        """The signing key's row, inserting a first key into an empty ring."""
        row = await transaction.fetch_one(_NEWEST)
        if row is None:
            await _insert(transaction, new_key(), self._clock())
            row = await transaction.fetch_one(_NEWEST)
            assert row is not None
        newest: Row = row
        return newest


_NEWEST = (
    "SELECT kid, private_key_pem, max_token_ttl_s FROM signing_keys ORDER BY sequence DESC LIMIT 1"
)


async def _insert(transaction: SqlTransaction, made: NewKey, now: datetime) -> None:
    await transaction.execute(
        "INSERT INTO signing_keys (kid, private_key_pem, public_jwk, create_time)"
        " VALUES (?, ?, ?, ?)",
        (made.kid, made.private_key_pem, made.public_jwk, now.isoformat(timespec="microseconds")),
    )


async def _ring(transaction: SqlTransaction) -> tuple[KeyInfo, ...]:
    rows = await transaction.fetch_all(
        "SELECT kid, public_jwk, create_time, max_token_ttl_s FROM signing_keys ORDER BY sequence"
    )
    successors: list[Row | None] = [*rows[1:], None]
    return tuple(
        KeyInfo(
            kid=row["kid"],
            create_time=datetime.fromisoformat(row["create_time"]),
            public_jwk=row["public_jwk"],
            retire_time=(
                None
                if successor is None
                else datetime.fromisoformat(successor["create_time"])
                + timedelta(seconds=row["max_token_ttl_s"])
            ),
        )
        for row, successor in zip(rows, successors, strict=True)
    )
