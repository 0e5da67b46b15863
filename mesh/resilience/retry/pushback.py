"""Server pushback: the server says when (or whether) to retry, as in gRPC's retry design (A6).

A server under load knows better than any client backoff when it can take the request again,
and that it cannot take it at all. It says so in the trailing metadata `grpc-retry-pushback-ms`:
a non-negative integer is the delay in milliseconds before the retry (it replaces the backoff);
a negative or unparseable value means "do not retry".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Final, Literal

PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
_INT32_MAX = 2**31 - 1
_INTEGER = re.compile(r"-?[0-9]+")


class NoRetry(enum.Enum):
    """The server's pushback forbids a retry."""

    NO_RETRY = "no-retry"


NO_RETRY: Final = NoRetry.NO_RETRY

Pushback = float | None | Literal[NoRetry.NO_RETRY]
"""Seconds to wait before retrying, None (no pushback), or NO_RETRY."""

Metadata = Iterable[tuple[str, str | bytes]]


def parse_pushback(metadata: Metadata | None) -> Pushback:
    """The pushback in `metadata` (trailing metadata: grpc.aio.Metadata or (key, value) pairs).

    Seconds (>= 0.0) for a valid value, None when absent, NO_RETRY when negative or
    malformed (not a 32-bit signed decimal integer). The first occurrence counts.
    """
    if metadata is None:
        return None
    for key, value in metadata:
        if key == PUSHBACK_KEY:
            return _parse_value(value)
    return None


def _parse_value(value: str | bytes) -> float | Literal[NoRetry.NO_RETRY]:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return NO_RETRY
    if not _INTEGER.fullmatch(value):
        return NO_RETRY
    millis = int(value)
    if millis < 0 or millis > _INT32_MAX:
        return NO_RETRY
    return millis / 1000.0
