"""Password hashes: scrypt (RFC 7914), a memory-hard KDF, with a random salt per password.

A hash is stored as one PHC-format string that carries its own parameters,
`$scrypt$ln=14,r=8,p=5$<salt>$<hash>` (standard base64 without padding, as passlib writes
it), so the parameters can be raised later without invalidating anyone: a hash made with other
parameters still verifies, and `needs_rehash` tells the caller to store a fresh one (Login does,
once the password is known to be right).

The default parameters are one of OWASP's equivalent scrypt settings (N=2^14, r=8, p=5): the
strength of N=2^17, p=1 with 16 MiB of memory per hash instead of 128 MiB, so that a burst of
logins cannot exhaust the host's memory. For the same reason at most `max_concurrent` hashes run
at once (the rest wait their turn), and passwords have a maximum length.

scrypt takes tens of milliseconds by design, so it runs on a worker thread (asyncio.to_thread),
never on the event loop. `verify` with no stored hash (an unknown email) runs the same KDF
against a throw-away salt and answers False, so an unknown email costs the same time as a
wrong password. Passwords are NFKC-normalized before hashing (NIST SP 800-63B), so the same
password typed on another keyboard (full-width digits, ligatures) still matches.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import unicodedata
from dataclasses import dataclass

SALT_BYTES = 16
HASH_BYTES = 32
_PHC = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt's cost parameters: N = 2**log2_n (CPU and memory), r (block size), p
    (parallelism; OpenSSL runs the lanes one after the other)."""

    log2_n: int = 14
    r: int = 8
    p: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.log2_n <= 30 or self.r < 1 or self.p < 1:
            raise ValueError(f"scrypt parameters out of range: {self}")

    @property
    def max_memory(self) -> int:
        """The bytes OpenSSL needs for one hash (128 * r * (N + p + 2)), with a little room."""
        return 128 * self.r * ((1 << self.log2_n) + self.p + 2) + 1024 * 1024


DEFAULT_PARAMS = ScryptParams()


class PasswordHasher:
    """Hashes new passwords with `params` and verifies passwords against stored hashes."""

    def __init__(self, params: ScryptParams = DEFAULT_PARAMS, *, max_concurrent: int = 4) -> None:
        self.params = params
        self._running = asyncio.Semaphore(max_concurrent)

    async def hash(self, password: str) -> str:
        """A new salted hash of the password, in PHC format."""
        salt = os.urandom(SALT_BYTES)
        async with self._running:
            derived = await asyncio.to_thread(_scrypt, password, salt, self.params)
        return _encode(self.params, salt, derived)

    async def verify(self, password: str, stored: str | None) -> bool:
        """Whether the password matches the stored hash. With stored None (no such account)
        the KDF runs all the same, on a random salt, and the answer is False."""
        if stored is None:
            params, salt, expected = self.params, os.urandom(SALT_BYTES), None
        else:
            params, salt, expected = _decode(stored)
        async with self._running:
            derived = await asyncio.to_thread(_scrypt, password, salt, params)
        return expected is not None and hmac.compare_digest(derived, expected)

    def needs_rehash(self, stored: str) -> bool:
        """Whether a stored hash was made with other parameters than this hasher's."""
        params, _, _ = _decode(stored)
        return params != self.params


def _scrypt(password: str, salt: bytes, params: ScryptParams) -> bytes:
    secret = unicodedata.normalize("NFKC", password).encode("utf-8")
    return hashlib.scrypt(
        secret,
        salt=salt,
        n=1 << params.log2_n,
        r=params.r,
        p=params.p,
        maxmem=params.max_memory,
        dklen=HASH_BYTES,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _encode(params: ScryptParams, salt: bytes, derived: bytes) -> str:
    return f"$scrypt$ln={params.log2_n},r={params.r},p={params.p}${_b64(salt)}${_b64(derived)}"


def _decode(stored: str) -> tuple[ScryptParams, bytes, bytes]:
    match = _PHC.fullmatch(stored)
    if match is None:
        raise ValueError("the stored password hash is not a $scrypt$ PHC string")
    log2_n, r, p, salt, derived = match.groups()
    try:
        return ScryptParams(int(log2_n), int(r), int(p)), _unb64(salt), _unb64(derived)
    except binascii.Error:
        raise ValueError("the stored password hash has malformed base64") from None
