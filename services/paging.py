"""Paging of List RPCs, the same for every service, as Google AIP-158 has it: page_size 0
means the default, values above the maximum are lowered to it, a negative one is refused,
and page_token is opaque to callers. A token carries the last key returned and the filter it
was issued for (its scope: a restaurant, a user), so that a token sent with another filter
is refused instead of silently mixing lists."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from services.refusals import invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_VERSION = 1


def page_size(
    requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """The page size to serve for a request's page_size; a Refusal when it is negative."""
    if requested < 0:
        raise invalid(f"page_size must not be negative, got {requested}")
    return min(requested or default, maximum)


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where the next page starts (`after`: the last key returned), and the filter the token
    belongs to (`scope`)."""

    scope: str
    after: str

    def encode(self) -> str:
        """URL-safe base64 (no padding) of a small JSON object."""
        payload = {"v": _VERSION, "s": self.scope, "a": self.after}
        data = json.dumps(payload, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str, rpc: str) -> PageToken:
        """Parse a token made by encode(); a Refusal naming page_token when it is not one."""
        malformed = invalid(
            f"page_token is malformed: send the next_page_token of the previous {rpc} "
            "response unchanged, or an empty page_token for the first page"
        )
        try:
            data = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
            payload = json.loads(data)
        except (binascii.Error, UnicodeError, ValueError):
            raise malformed from None
        if not (
            isinstance(payload, dict)
            and payload.get("v") == _VERSION
            and isinstance(payload.get("s"), str)
            and isinstance(payload.get("a"), str)
        ):
            raise malformed
        return cls(scope=payload["s"], after=payload["a"])

    @classmethod
    def resume(cls, token: str, *, rpc: str, field: str, scope: str) -> str:
        """The key to start after for a request with `token` ("" for the first page); a
        Refusal when the token is malformed or was issued for another value of `field`."""
        if not token:
            return ""
        decoded = cls.decode(token, rpc)
        if decoded.scope != scope:
            raise invalid(
                f"page_token was issued for {field} {decoded.scope!r}, not {scope!r}: "
                f"send the same {field} on every page",
            )
        return decoded.after
