"""The users service: accounts, logins, and the access tokens (ES256 JWTs) other services
verify with its key set. `verify_token` checks such a token against GetJwks's key set."""

from services.users.tokens import InvalidToken, VerifiedToken, verify_token

__all__ = ["InvalidToken", "VerifiedToken", "verify_token"]
