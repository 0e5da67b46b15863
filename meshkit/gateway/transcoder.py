"""HTTP/JSON to gRPC, from the services' `google.api.http` annotations, read at run time.

grpc-gateway generates Go code per API and Envoy's transcoder needs a descriptor set built
ahead of time; here the mappings come from the descriptors the gateway already fetched from
the services' reflection (descriptors.py), so a service that registers is reachable over
HTTP at once. What this module does is the mapping alone, with no I/O:

- `PathTemplate`: the template syntax of google/api/http.proto (`/v1/items/{item_id}`,
  `{name=shelves/*}`, `*`, `**`, a trailing `:verb`), matched against a request path.
- `http_routes(pool, services)`: every HttpRule (and its additional bindings) of the
  services' methods, as HttpRoutes.
- `request_message`: the proto3 JSON mapping of the body (`body: "*"` or one field), the
  path variables, and, for the fields neither sets, the query parameters (repeated keys for
  repeated fields, dotted names for nested ones); both field spellings, `item_id` and
  `itemId`, are accepted, as proto3 JSON says.
- `response_json`, `error_body`, `http_status`: lowerCamelCase out; errors in grpc-gateway's
  shape, `{code, message, details}`, with the standard gRPC-to-HTTP status mapping
  (google/rpc/code.proto's comments, grpc-gateway's HTTPStatusFromCode).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


class BadRequest(Exception):
    """A request that cannot become the method's message; the message names the field."""


# -- path templates --------------------------------------------------------------------------

_VARIABLE = re.compile(r"\{([A-Za-z_][\w.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled google.api.http path template."""

    text: str
    pattern: re.Pattern[str]
    variables: tuple[str, ...]
    """The field paths the template's variables set, in order (`item_id`, `item.item_id`)."""
    verb: str = ""
    """The custom method's `:verb`, if any."""

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        if not text.startswith("/"):
            raise ValueError(f"path template {text!r} must start with /")
        path, verb = text, ""
        last = text.rsplit("/", 1)[-1]
        if ":" in last and "}" not in last.rsplit(":", 1)[1]:
            path, verb = text[: text.rindex(":")], text[text.rindex(":") :]
        regex, variables, position = [], [], 0
        for found in _VARIABLE.finditer(path):
            regex.append(_segments(path[position : found.start()]))
            variables.append(found.group(1))
            inner = _segments(found.group(2)) if found.group(2) else "[^/]+"
            regex.append(f"(?P<v{len(variables) - 1}>{inner})")
            position = found.end()
        regex.append(_segments(path[position:]))
        regex.append(re.escape(verb))
        return cls(text, re.compile("".join(regex)), tuple(variables), verb)

    def match(self, path: str) -> dict[str, str] | None:
        """The variables' values (percent-decoded) if `path` matches, else None."""
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {
            variable: urllib.parse.unquote(found.group(f"v{index}"))
            for index, variable in enumerate(self.variables)
        }


def _segments(text: str) -> str:
    """A regex for literal text with `*` (one segment) and `**` (any number)."""
    parts = re.split(r"(\*\*|\*)", text)
    return "".join(
        ".+" if part == "**" else "[^/]+" if part == "*" else re.escape(part) for part in parts
    )


# -- routes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpRoute:
    http_method: str
    template: PathTemplate
    grpc_method: str
    """`/pkg.Service/Method`."""
    input: Descriptor
    output: Descriptor
    body: str
    """"" (no body), "*" (the whole message) or a field name."""
    server_streaming: bool

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.input)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.output)


def http_rules(method: MethodDescriptor) -> list[http_pb2.HttpRule]:
    """The method's HttpRule and its additional bindings (none when it has no annotation)."""
    options = descriptor_pb2.MethodOptions.FromString(method.GetOptions().SerializeToString())
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def http_routes(pool: descriptor_pool.DescriptorPool, services: Iterable[str]) -> list[HttpRoute]:
    """The HTTP routes of `services` (fully-qualified names) that `pool` describes."""
    routes = []
    for name in sorted(services):
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        for method in service.methods:
            if method.client_streaming:
                continue  # HTTP/JSON has no client streams (grpc-gateway's rule too)
            for rule in http_rules(method):
                kind = rule.WhichOneof("pattern")
                if kind is None:
                    continue
                if kind == "custom":
                    verb, path = rule.custom.kind.upper(), rule.custom.path
                else:
                    verb, path = kind.upper(), getattr(rule, kind)
                try:
                    template = PathTemplate.parse(path)
                except ValueError as exc:
                    log.warning("%s.%s: http rule ignored: %s", name, method.name, exc)
                    continue
                routes.append(
                    HttpRoute(
                        verb,
                        template,
                        f"/{name}/{method.name}",
                        method.input_type,
                        method.output_type,
                        rule.body,
                        method.server_streaming,
                    )
                )
    # Templates with a `:verb` first, so that `/v1/orders/o-1:watch` is WatchOrder and not
    # GetOrder of an order "o-1:watch" (grpc-gateway's rule).
    return sorted(routes, key=lambda route: not route.template.verb)


@dataclass(frozen=True, slots=True)
class Match:
    route: HttpRoute
    variables: dict[str, str]


def find_route(
    routes: Sequence[HttpRoute], http_method: str, path: str
) -> tuple[Match | None, list[str]]:
    """The route for the request (the first of `routes` to match, in http_routes' order), or
    None and the methods the path allows (for a 405)."""
    allowed = []
    for route in routes:
        variables = route.template.match(path)
        if variables is None:
            continue
        if route.http_method == http_method:
            return Match(route, variables), []
        allowed.append(route.http_method)
    return None, sorted(set(allowed))


# -- requests ---------------------------------------------------------------------------------


def request_message(match: Match, query: Iterable[tuple[str, str]], body: bytes | None) -> Message:
    """The method's request from the body, the path's variables and the query parameters."""
    route = match.route
    message = route.request_class()()
    if route.body:
        document = _json_body(body)
        try:
            if route.body == "*":
                json_format.ParseDict(document, message)
            else:
                field = _field(route.input, route.body)
                if field is None or field.message_type is None:
                    raise BadRequest(f"body field {route.body!r} is not a message field")
                json_format.ParseDict(document, getattr(message, field.name))
        except json_format.ParseError as error:
            raise BadRequest(f"request body: {error}") from None
    covered = {route.body} if route.body and route.body != "*" else set()
    for path, value in match.variables.items():
        _set(message, path, [value])
        covered.add(path)
    if route.body != "*":
        grouped: dict[str, list[str]] = {}
        for key, value in query:
            grouped.setdefault(key, []).append(value)
        for key, values in grouped.items():
            if _snake(key).split(".")[0] in {_snake(c).split(".")[0] for c in covered}:
                continue
            _set(message, key, values)
    return message


def _json_body(body: bytes | None) -> Any:
    if not body or not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"request body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _field(descriptor: Any, name: str) -> FieldDescriptor | None:
    found: FieldDescriptor | None = descriptor.fields_by_name.get(name)
    if found is None:
        found = next((f for f in descriptor.fields if f.json_name == name), None)
    return found


def _set(message: Message, path: str, values: Sequence[str]) -> None:
    """Set the field at dotted `path` (either spelling) from text values."""
    *parents, last = path.split(".")
    target = message
    for part in parents:
        field = _field(target.DESCRIPTOR, part)
        if field is None or field.message_type is None or _repeated(field):
            raise BadRequest(f"{path!r}: no such message field {part!r}")
        target = getattr(target, field.name)
    field = _field(target.DESCRIPTOR, last)
    if field is None:
        raise BadRequest(f"{path!r}: {target.DESCRIPTOR.full_name} has no field {last!r}")
    if field.message_type is not None and not _is_wrapper(field):
        raise BadRequest(f"{path!r}: a message field cannot be set from the URL")
    if not _repeated(field) and len(values) > 1:
        raise BadRequest(f"{path!r} is given {len(values)} times; it takes one value")
    converted = [_scalar(field, value, path) for value in values]
    try:
        json_format.ParseDict({field.name: converted if _repeated(field) else converted[0]}, target)
    except json_format.ParseError as error:
        raise BadRequest(f"{path!r}: {error}") from None


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_wrapper(field: FieldDescriptor) -> bool:
    kind = field.message_type
    return kind is not None and kind.full_name.startswith("google.protobuf.")


def _scalar(field: FieldDescriptor, value: str, path: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise BadRequest(f"{path!r}: {value!r} is not true or false")
    return value  # proto3 JSON takes numbers and enums as strings too


# -- headers --------------------------------------------------------------------------------

_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(value: str | None) -> float | None:
    """Seconds of a `grpc-timeout` header (`10S`, `500m`); None when absent."""
    if not value:
        return None
    found = _TIMEOUT.match(value.strip())
    if found is None:
        raise BadRequest(f"grpc-timeout {value!r}: expected digits and one of H M S m u n")
    return int(found.group(1)) * _UNITS[found.group(2)]


# -- responses ---------------------------------------------------------------------------------


def response_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def error_body(code: grpc.StatusCode, message: str, status_details: bytes | None = None) -> bytes:
    """grpc-gateway's error body; `status_details` is grpc-status-details-bin, whose details
    (RetryInfo, ...) are given in their JSON form."""
    details: list[Any] = []
    if status_details:
        try:
            status = status_pb2.Status.FromString(status_details)
            details = [json_format.MessageToDict(any_detail) for any_detail in status.details]
        except Exception:  # a detail of a type this process does not know
            details = []
    document = {"code": code.value[0], "message": message, "details": details}
    return json.dumps(document).encode()


def metadata_dict(metadata: Iterable[tuple[str, Any]] | None) -> Mapping[str, Any]:
    return {key: value for key, value in (metadata or ())}
