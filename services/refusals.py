"""How a servicer refuses a request: raise Refusal (or a store's IdempotencyConflict, or
DatabaseUnavailable when the database cannot be reached) with the gRPC code and a message
naming the field or the state, and `@refusing` turns it into the call's status. Domain code
then reads as checks that raise, with no `context.abort` plumbing, and a refusal can come
from a store's transaction as well as from the servicer."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from meshkit.storage.database import DatabaseUnavailable
from meshkit.storage.idempotency import IdempotencyConflict

Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")
ServicerContext = grpc.aio.ServicerContext[Any, Any]


class Refusal(Exception):
    """A request refused for a reason the caller can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> Refusal:
    """INVALID_ARGUMENT: the message names the field."""
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> Refusal:
    """NOT_FOUND: the message names the field and the id."""
    return Refusal(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> Refusal:
    """FAILED_PRECONDITION: the message names the state that refuses the request."""
    return Refusal(grpc.StatusCode.FAILED_PRECONDITION, message)


def status_of(error: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status a refusal ends its call with; None for any other exception."""
    if isinstance(error, Refusal):
        return error.code, str(error)
    if isinstance(error, IdempotencyConflict):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, DatabaseUnavailable):
        # The caller may try again (another instance, or later); the effect, if any, is
        # in the database or not at all, and an idempotency key gives it once.
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return None


def refusing(
    method: Callable[[Servicer, Request, ServicerContext], Awaitable[Response]],
) -> Callable[[Servicer, Request, ServicerContext], Awaitable[Response]]:
    """A unary servicer method whose refusals end the call with their status."""

    @functools.wraps(method)
    async def refused(self: Servicer, request: Request, context: ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except (Refusal, IdempotencyConflict, DatabaseUnavailable) as error:
            status = status_of(error)
            assert status is not None
            await context.abort(*status)
            raise  # abort() raises; this line tells the type checker

    return refused
