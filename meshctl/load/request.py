"""Which method to call and what to send: method lookup and JSON request templates.

The method comes from server reflection, as with ghz and grpcurl (any service, nothing
installed), or from the installed foodmesh stubs (no round trips, works without reflection);
either way the runner gets message classes and never sees a descriptor.

A body is proto3 JSON with placeholders in string values, so that calls can differ (a fresh
idempotency key per call, a random item). It is checked against the request message once,
before any load is sent, with every value a placeholder can take at its ends (each `choice`,
both bounds of a `randint`): a run must not fail half-way on a body that cannot be encoded.

Rendering is on the hot path, so placeholders are compiled once into small functions, and the
top-level fields without placeholders are encoded once: a call encodes only the fields with
placeholders and appends them to those bytes. Protobuf's wire format merges concatenated
messages, so the server decodes the same message as from one encoding of the whole body.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from meshctl.load.errors import BadInput


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC as the load tester needs it."""

    path: str
    """The full method path: "/foodmesh.orders.v1.OrderService/PlaceOrder"."""
    request_type: type[Message]
    response_type: type[Message]
    client_streaming: bool
    server_streaming: bool


_SERVICE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def parse_method_name(name: str) -> tuple[str, str]:
    """("pkg.Service", "Method") from "pkg.Service/Method", "pkg.Service.Method" or
    "/pkg.Service/Method"; BadInput naming the text otherwise."""
    if "/" in name:
        service, _, method = name.removeprefix("/").partition("/")
    else:
        service, _, method = name.rpartition(".")
    if not (_SERVICE_NAME.fullmatch(service) and _IDENTIFIER.fullmatch(method)):
        raise BadInput(
            f"bad method name {name!r}: expected pkg.Service/Method or pkg.Service.Method"
        )
    return service, method


@cache
def _foodmesh_services() -> dict[str, ServiceDescriptor]:
    """Every service the installed foodmesh stubs declare, by full name."""
    import foodmesh

    services: dict[str, ServiceDescriptor] = {}
    for module_info in pkgutil.walk_packages(foodmesh.__path__, "foodmesh."):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(module_info.name)
            for service in module.DESCRIPTOR.services_by_name.values():
                services[service.full_name] = service
    return services


def _method_info(service: ServiceDescriptor, method_name: str) -> MethodInfo:
    method = service.methods_by_name.get(method_name)
    if method is None:
        methods = ", ".join(service.methods_by_name) or "none"
        raise BadInput(
            f"service {service.full_name} has no method {method_name} (methods: {methods})"
        )
    return MethodInfo(
        path=f"/{service.full_name}/{method.name}",
        request_type=message_factory.GetMessageClass(method.input_type),
        response_type=message_factory.GetMessageClass(method.output_type),
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


def method_from_stubs(name: str) -> MethodInfo:
    """The method from the installed foodmesh stubs (every foodmesh.*_pb2 module imported);
    BadInput naming the service or the method when there is no such one."""
    service_name, method_name = parse_method_name(name)
    services = _foodmesh_services()
    if service_name not in services:
        known = ", ".join(sorted(services)) or "none"
        raise BadInput(f"unknown service {service_name} (known: {known})")
    return _method_info(services[service_name], method_name)


async def method_from_reflection(address: str, name: str, timeout: float = 5.0) -> MethodInfo:
    """The method from server reflection at `address` ("host:port"), with message classes
    built from the descriptors the server sends; BadInput when the server cannot be reached,
    has no reflection, or has no such service or method (the message names which).

    `timeout` bounds the whole lookup. grpcio-reflection's client is synchronous, so it runs
    in a thread; closing the channel ends its calls when the lookup is cancelled or late.
    """
    service_name, method_name = parse_method_name(name)
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(address)
    try:
        try:
            await asyncio.to_thread(grpc.channel_ready_future(channel).result, timeout)
        except grpc.FutureTimeoutError:
            raise BadInput(f"cannot reach {address}: no connection within {timeout:g} s") from None
        lookup = asyncio.to_thread(_reflect, channel, address, service_name, method_name)
        try:
            return await asyncio.wait_for(lookup, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise BadInput(
                f"server reflection at {address} did not answer within {timeout:g} s"
            ) from None
    finally:
        channel.close()


def _reflect(
    channel: grpc.Channel, address: str, service_name: str, method_name: str
) -> MethodInfo:
    database = ProtoReflectionDescriptorDatabase(channel)
    try:
        services: list[str] = list(database.get_services())
        if service_name not in services:
            known = ", ".join(sorted(services)) or "none"
            raise BadInput(f"unknown service {service_name} at {address} (the server has: {known})")
        service = descriptor_pool.DescriptorPool(database).FindServiceByName(service_name)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise BadInput(f"the server at {address} does not offer server reflection") from None
        raise BadInput(
            f"server reflection at {address} failed: {error.code().name}: {error.details()}"
        ) from None
    except KeyError:
        raise BadInput(
            f"the server at {address} lists {service_name} but sends no descriptor for it"
        ) from None
    return _method_info(service, method_name)


Render = Callable[[int], Any]
"""A compiled piece of the body: call number -> its JSON value (str, dict or list)."""

Compiled = tuple[Any, Render | None]
"""(the constant JSON value, None), or (None, how to render the value of a call)."""

_PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
_PLACEHOLDERS = "{{n}}, {{worker}}, {{uuid}}, {{choice a,b,c}}, {{randint LO HI}}, {{now}}"
_BOOLS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class _Placeholder:
    """A parsed placeholder: how to make its generator, and the values to validate with."""

    make: Callable[[random.Random], Render]
    samples: tuple[str, ...]


def _parse_placeholder(text: str, worker: int) -> _Placeholder | str:
    """The placeholder inside "{{text}}", or its text when it is constant ({{worker}})."""
    kind, _, args = text.strip().partition(" ")
    args = args.strip()
    shown = "{{" + text + "}}"
    if kind in ("n", "worker", "uuid", "now") and args:
        raise BadInput(f"placeholder {shown} takes no arguments")
    if kind == "n":
        return _Placeholder(lambda rng: str, ("0",))
    if kind == "worker":
        return str(worker)
    if kind == "uuid":
        return _Placeholder(_uuid_generator, (str(uuid.UUID(int=0, version=4)),))
    if kind == "now":
        return _Placeholder(lambda rng: _now, (_now(0),))
    if kind == "choice":
        options = tuple(option.strip() for option in args.split(","))
        if not all(options):
            raise BadInput(f"placeholder {shown} needs non-empty values: {{{{choice a,b,c}}}}")
        return _Placeholder(lambda rng: lambda n: rng.choice(options), options)
    if kind == "randint":
        bounds = args.split()
        try:
            lo, hi = (int(bound) for bound in bounds)
        except ValueError:
            raise BadInput(
                f"placeholder {shown} needs two integers: {{{{randint LO HI}}}}"
            ) from None
        if lo > hi:
            raise BadInput(f"placeholder {shown}: LO is greater than HI")
        return _Placeholder(lambda rng: lambda n: str(rng.randint(lo, hi)), (str(lo), str(hi)))
    raise BadInput(f"unknown placeholder {shown} (known: {_PLACEHOLDERS})")


def _uuid_generator(rng: random.Random) -> Render:
    return lambda n: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _now(n: int) -> str:
    return str(time.time_ns() // 1_000_000)


Bind = Callable[[_Placeholder], Render]
"""Turns a placeholder into the generator a compiled body calls."""


def _compile_text(text: str, worker: int, bind: Bind, as_bool: bool) -> Compiled:
    parts: list[Render] = []
    literal, position, templated = "", 0, False
    for match in _PLACEHOLDER.finditer(text):
        literal += text[position : match.start()]
        position = match.end()
        placeholder = _parse_placeholder(match.group(1), worker)
        if isinstance(placeholder, str):
            literal += placeholder
            continue
        if literal:
            parts.append(_constant(literal))
            literal = ""
        parts.append(bind(placeholder))
        templated = True
    literal += text[position:]
    if not templated:
        return literal, None
    if literal:
        parts.append(_constant(literal))
    render = parts[0] if len(parts) == 1 else _joined(parts)
    return None, _as_bool(render) if as_bool else render


def _joined(parts: Sequence[Render]) -> Render:
    return lambda n: "".join([part(n) for part in parts])


def _as_bool(render: Render) -> Render:
    """Rendered "true" and "false" as JSON bools: proto3 JSON takes numbers in quotes, but a
    bool only bare."""
    return lambda n: _BOOLS.get(text := render(n), text)


def _constant(value: str) -> Render:
    return lambda n: value


FieldLookup = Callable[[str], FieldDescriptor | None]


def _no_fields(key: str) -> FieldDescriptor | None:
    return None


def _message_fields(message: Descriptor) -> FieldLookup:
    """The field a JSON key names: its proto name or its JSON (lowerCamel) name."""
    if message.full_name.startswith("google.protobuf."):
        return _no_fields  # well-known types have their own JSON forms (Struct, Any, ...)
    by_name, by_json_name = message.fields_by_name, message.fields_by_camelcase_name
    return lambda key: by_name.get(key) or by_json_name.get(key)


def _split_object(
    obj: dict[str, Any], fields: FieldLookup, worker: int, bind: Bind
) -> tuple[dict[str, Any], list[tuple[str, Render]]]:
    """The object's constant members, and its members with placeholders."""
    constant: dict[str, Any] = {}
    templated: list[tuple[str, Render]] = []
    for key, value in obj.items():
        fixed, render = _compile_value(value, fields(key), worker, bind)
        if render is None:
            constant[key] = fixed
        else:
            templated.append((key, render))
    return constant, templated


def _compile_value(value: Any, field: FieldDescriptor | None, worker: int, bind: Bind) -> Compiled:
    if isinstance(value, str):
        return _compile_text(value, worker, bind, _wants_bool(field))
    if isinstance(value, list):
        items = [_compile_value(item, field, worker, bind) for item in value]
        if all(render is None for _, render in items):
            return [fixed for fixed, _ in items], None
        return None, lambda n: [fixed if render is None else render(n) for fixed, render in items]
    if isinstance(value, dict):
        constant, templated = _split_object(value, _fields_of_object(field), worker, bind)
        if not templated:
            return constant, None
        rest = _object(templated)
        return None, lambda n: constant | rest(n)
    return value, None


def _object(members: Sequence[tuple[str, Render]]) -> Render:
    return lambda n: {key: render(n) for key, render in members}


def _fields_of_object(field: FieldDescriptor | None) -> FieldLookup:
    """What the keys of a JSON object name when the object is `field`'s value."""
    message = field.message_type if field is not None else None
    if message is None:
        return _no_fields
    if message.GetOptions().map_entry:  # keys are map keys; every value is the map's value
        value_field = message.fields_by_name["value"]
        return lambda key: value_field
    return _message_fields(message)


def _wants_bool(field: FieldDescriptor | None) -> bool:
    if field is None:
        return False
    if field.message_type is not None:
        return field.message_type.full_name == "google.protobuf.BoolValue"
    return field.type == FieldDescriptor.TYPE_BOOL


class _MessageEncoder:
    """One message of the body: the constant top-level fields encoded once, the fields with
    placeholders encoded per call and appended."""

    __slots__ = ("_constant", "_message_type", "_prefix", "_rest")

    def __init__(
        self, obj: dict[str, Any], message_type: type[Message], worker: int, bind: Bind
    ) -> None:
        self._message_type = message_type
        self._rest: Render | None
        descriptor = cast(Descriptor, message_type.DESCRIPTOR)  # the stubs also name upb's
        if descriptor.full_name.startswith("google.protobuf."):
            # A well-known type has its own JSON form (Any's "@type" goes with its fields).
            fixed, self._rest = _compile_value(obj, None, worker, bind)
            self._constant: dict[str, Any] = {} if self._rest else fixed
        else:
            fields = _message_fields(descriptor)
            self._constant, templated = _split_object(obj, fields, worker, bind)
            self._rest = _object(templated) if templated else None
        self._prefix = self._encode(self._constant)

    def _encode(self, obj: dict[str, Any]) -> bytes:
        return json_format.ParseDict(obj, self._message_type()).SerializeToString()

    def __call__(self, n: int) -> bytes:
        """The encoded message of call `n`."""
        if self._rest is None:
            return self._prefix
        return self._prefix + self._encode(self._rest(n))


def _messages_of(body: Any, method: MethodInfo) -> list[dict[str, Any]]:
    """The body's messages: the array's objects (client streaming) or the one object."""
    if method.client_streaming:
        if not isinstance(body, list):
            raise BadInput(
                f"{method.path} is client-streaming: the request must be a JSON array, "
                "one object per message sent"
            )
        for index, item in enumerate(body):
            if not isinstance(item, dict):
                raise BadInput(f"message {index} of the request stream must be a JSON object")
        return body
    if not isinstance(body, dict):
        hint = " (an array is for client-streaming methods only)" if isinstance(body, list) else ""
        raise BadInput(f"the request of {method.path} must be a JSON object{hint}")
    return [body]


def _encoders(
    messages: list[dict[str, Any]], method: MethodInfo, worker: int, bind: Bind
) -> list[_MessageEncoder]:
    """An encoder per message, each checked by encoding call 0."""
    encoders: list[_MessageEncoder] = []
    for index, obj in enumerate(messages):
        where = method.request_type.DESCRIPTOR.full_name
        if method.client_streaming:
            where += f" (message {index} of the stream)"
        try:
            encoder = _MessageEncoder(obj, method.request_type, worker, bind)
            encoder(0)
        except json_format.ParseError as error:
            raise BadInput(f"the request does not fit {where}: {error}") from None
        encoders.append(encoder)
    return encoders


def _sample(k: int) -> Bind:
    """Placeholders bound to their k-th sample value (cycling), for validation."""
    return lambda placeholder: _constant(placeholder.samples[k % len(placeholder.samples)])


class RequestTemplate:
    """A JSON request body with placeholders, checked against the request message once, then
    rendered per call.

    Placeholders take a whole JSON string value or part of one: {{n}} (the call number,
    0-based across the run), {{worker}} (worker process index), {{uuid}} (a random UUID4),
    {{choice a,b,c}} (one of the listed values at random), {{randint LO HI}} (inclusive),
    {{now}} (Unix time in milliseconds). A string that is exactly one placeholder may fill a
    number or bool field ("quantity": "{{randint 1 5}}"), as proto3 JSON allows numbers in
    quotes. For a client-streaming method the body is a JSON array, one object per message
    sent; otherwise one object.

    Placeholders in object keys are not expanded. A bool field takes a placeholder whose
    value is "true" or "false" ("{{choice true,false}}"); it is sent as a JSON bool.
    """

    __slots__ = ("_encoders", "_fixed")

    def __init__(self, encoders: list[_MessageEncoder], fixed: tuple[bytes, ...] | None) -> None:
        """Use `parse`."""
        self._encoders = encoders
        self._fixed = fixed

    @classmethod
    def parse(
        cls, data: str, method: MethodInfo, worker: int = 0, *, seed: int | None = None
    ) -> RequestTemplate:
        """The template for `data` (JSON text); BadInput (naming the field, the placeholder or
        the JSON error position) when it is not valid JSON, uses an unknown placeholder, or
        does not fit the request message once rendered.

        Random values come from a generator of this template's own, seeded from the OS, or
        from (`seed`, `worker`) for repeatable runs where workers still differ.
        """
        try:
            body = json.loads(data)
        except json.JSONDecodeError as error:
            raise BadInput(
                f"the request is not valid JSON: {error.msg} "
                f"at line {error.lineno} column {error.colno} (char {error.pos})"
            ) from None
        messages = _messages_of(body, method)
        rng = random.Random(f"{seed}/{worker}") if seed is not None else random.Random()
        placeholders: list[_Placeholder] = []

        def bind(placeholder: _Placeholder) -> Render:
            placeholders.append(placeholder)
            return placeholder.make(rng)

        encoders = _encoders(messages, method, worker, bind)
        for k in range(max((len(p.samples) for p in placeholders), default=0)):
            _encoders(messages, method, worker, _sample(k))
        fixed = None if placeholders else tuple(encoder(0) for encoder in encoders)
        return cls(encoders, fixed)

    @property
    def constant(self) -> bool:
        """True when the body has no placeholders: every call sends the same bytes."""
        return self._fixed is not None

    def render(self, n: int) -> Sequence[bytes]:
        """The serialized request messages of call number `n`: one for a unary request, the
        stream's messages in order for a client-streaming one. A constant template returns
        the same object every time; rendering must be cheap (it is on the hot path)."""
        if self._fixed is not None:
            return self._fixed
        return tuple([encoder(n) for encoder in self._encoders])
