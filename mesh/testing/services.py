"""What a test serves: generated servicers or generic handlers, and the handlers they hold.

Both the in-process server and the mock channel take the same values, so that a test can move
between them by changing one line:

- `(add_XServicer_to_server, servicer)`: the generated registration function and a servicer
  (any object with the service's methods, usually a subclass of the generated XServicer);
- a `grpc.GenericRpcHandler`, e.g. `grpc.method_handlers_generic_handler("pkg.Svc", {...})`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import grpc

if TYPE_CHECKING:  # generic only in grpc-stubs
    MethodHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    GenericHandler: TypeAlias = grpc.GenericRpcHandler[Any, Any]
else:
    MethodHandler = grpc.RpcMethodHandler
    GenericHandler = grpc.GenericRpcHandler

AddServicer = Callable[[Any, Any], None]
Service: TypeAlias = "GenericHandler | tuple[AddServicer, Any]"
"""A generic handler, or a generated add_XServicer_to_server function and its servicer."""


class CallDetails(NamedTuple):
    """grpc.HandlerCallDetails: what a generic handler is asked to route."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class _Recorder:
    """Stands in for a server when a generated add_XServicer_to_server function runs."""

    def __init__(self) -> None:
        self.handlers: list[GenericHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[GenericHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, MethodHandler]
    ) -> None:
        pass  # the generic handler added alongside already routes these methods


def generic_handlers(services: Sequence[Service]) -> list[GenericHandler]:
    """The generic handlers that serve `services`, in order."""
    found: list[GenericHandler] = []
    for service in services:
        if isinstance(service, tuple):
            add, servicer = service
            recorder = _Recorder()
            add(servicer, recorder)
            found.extend(recorder.handlers)
        else:
            found.append(service)
    return found


def service_names(handlers: Iterable[GenericHandler]) -> list[str]:
    """The fully-qualified names of the services these handlers serve (where they say)."""
    names = []
    for handler in handlers:
        name = getattr(handler, "service_name", None)
        if callable(name):
            names.append(str(name()))
    return names


def find_handler(handlers: Sequence[GenericHandler], details: CallDetails) -> MethodHandler | None:
    """The method handler the first generic handler that knows `details.method` returns."""
    for handler in handlers:
        found = handler.service(details)  # type: ignore[arg-type]
        if found is not None:
            return found
    return None
