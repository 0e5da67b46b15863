"""meshctl load's method lookup (names, foodmesh stubs, server reflection against a real
server) and its JSON request templates (placeholders, encoding, errors)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
    text_format,
    wrappers_pb2,
)
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2_grpc

from foodmesh.catalog.v1 import catalog_pb2
from foodmesh.orders.v1 import orders_pb2
from mesh.testing import InProcessServer
from meshctl.load.errors import BadInput
from meshctl.load.request import (
    MethodInfo,
    RequestTemplate,
    method_from_reflection,
    method_from_stubs,
    parse_method_name,
)
from scripts.processes import free_tcp_port

PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"
ORDER = '{"customer_id": "ada", "lines": [{"item_id": "roma-margherita", "quantity": 2}]}'


# Method names


@pytest.mark.parametrize(
    "text", ["pkg.v1.Service/Method", "/pkg.v1.Service/Method", "pkg.v1.Service.Method"]
)
def test_method_name_forms(text: str) -> None:
    assert parse_method_name(text) == ("pkg.v1.Service", "Method")


def test_method_name_of_a_service_without_package() -> None:
    assert parse_method_name("Service/Method") == ("Service", "Method")


@pytest.mark.parametrize(
    "text",
    ["", "Method", "pkg.S/", "/pkg.S.Method", "pkg.S/Method/x", "a..B/M", "p.S/M-x", "p.S/M x"],
)
def test_bad_method_name_is_named(text: str) -> None:
    with pytest.raises(BadInput, match="bad method name") as error:
        parse_method_name(text)
    assert repr(text) in str(error.value)


# Methods from the foodmesh stubs


def test_stubs_place_order() -> None:
    method = method_from_stubs(PLACE_ORDER)
    assert method == MethodInfo(
        path="/foodmesh.orders.v1.OrderService/PlaceOrder",
        request_type=orders_pb2.PlaceOrderRequest,
        response_type=orders_pb2.Order,
        client_streaming=False,
        server_streaming=False,
    )


@pytest.mark.parametrize(
    ("name", "path", "request_type", "response_type"),
    [
        (
            "foodmesh.catalog.v1.CatalogService.GetItem",
            "/foodmesh.catalog.v1.CatalogService/GetItem",
            catalog_pb2.GetItemRequest,
            catalog_pb2.Item,
        ),
        (
            "/foodmesh.catalog.v1.CatalogService/ListItems",
            "/foodmesh.catalog.v1.CatalogService/ListItems",
            catalog_pb2.ListItemsRequest,
            catalog_pb2.ListItemsResponse,
        ),
    ],
)
def test_stubs_catalog_methods(
    name: str, path: str, request_type: type[Message], response_type: type[Message]
) -> None:
    method = method_from_stubs(name)
    assert (method.path, method.request_type, method.response_type) == (
        path,
        request_type,
        response_type,
    )


def test_stubs_unknown_service_lists_known_ones() -> None:
    with pytest.raises(BadInput) as error:
        method_from_stubs("foodmesh.tips.v1.TipService/Pay")
    message = str(error.value)
    assert message.startswith("unknown service foodmesh.tips.v1.TipService (known: ")
    assert "foodmesh.catalog.v1.CatalogService" in message
    assert "foodmesh.orders.v1.OrderService" in message


def test_stubs_unknown_method_lists_the_service_methods() -> None:
    with pytest.raises(BadInput) as error:
        method_from_stubs("foodmesh.orders.v1.OrderService/RefundOrder")
    assert str(error.value) == (
        "service foodmesh.orders.v1.OrderService has no method RefundOrder"
        " (methods: PlaceOrder, GetOrder, CancelOrder, WatchOrder)"
    )


# Methods from server reflection, against a real grpc.aio server


@pytest.fixture
async def reflecting_server() -> AsyncIterator[str]:
    """A server with the project's reflection for the catalog and orders services (reflection
    needs their names only, not servicers)."""
    names = ("foodmesh.catalog.v1.CatalogService", "foodmesh.orders.v1.OrderService")
    async with InProcessServer(reflection=names) as server:
        yield server.address


async def test_reflection_finds_method_with_classes_from_the_server(
    reflecting_server: str,
) -> None:
    method = await method_from_reflection(reflecting_server, PLACE_ORDER)
    assert method.path == "/foodmesh.orders.v1.OrderService/PlaceOrder"
    assert (method.client_streaming, method.server_streaming) == (False, False)
    # Built from the descriptors the server sent, not taken from the installed stubs...
    assert method.request_type is not orders_pb2.PlaceOrderRequest
    assert method.request_type.DESCRIPTOR.full_name == "foodmesh.orders.v1.PlaceOrderRequest"
    assert method.response_type.DESCRIPTOR.full_name == "foodmesh.orders.v1.Order"
    # ...and the bytes they encode are what the stubs decode.
    (encoded,) = RequestTemplate.parse(ORDER, method).render(0)
    assert orders_pb2.PlaceOrderRequest.FromString(encoded) == orders_pb2.PlaceOrderRequest(
        customer_id="ada", lines=[orders_pb2.OrderLine(item_id="roma-margherita", quantity=2)]
    )


async def test_reflection_unknown_service_lists_what_the_server_has(
    reflecting_server: str,
) -> None:
    with pytest.raises(BadInput) as error:
        await method_from_reflection(reflecting_server, "foodmesh.tips.v1.TipService.Pay")
    assert str(error.value) == (
        f"unknown service foodmesh.tips.v1.TipService at {reflecting_server} "
        "(the server has: foodmesh.catalog.v1.CatalogService, foodmesh.orders.v1.OrderService, "
        "grpc.reflection.v1alpha.ServerReflection)"
    )


async def test_reflection_unknown_method_lists_the_service_methods(
    reflecting_server: str,
) -> None:
    with pytest.raises(BadInput) as error:
        await method_from_reflection(reflecting_server, "foodmesh.catalog.v1.CatalogService/Nope")
    assert str(error.value) == (
        "service foodmesh.catalog.v1.CatalogService has no method Nope"
        " (methods: GetItem, ListItems, PutItem)"
    )


async def test_reflection_unreachable_address() -> None:
    address = f"127.0.0.1:{free_tcp_port()}"
    with pytest.raises(BadInput, match=f"^cannot reach {address}: no connection within 0.5 s$"):
        await method_from_reflection(address, PLACE_ORDER, timeout=0.5)


async def test_reflection_server_without_reflection() -> None:
    async with InProcessServer() as server:
        with pytest.raises(BadInput) as error:
            await method_from_reflection(server.address, PLACE_ORDER)
        assert str(error.value) == (
            f"the server at {server.address} does not offer server reflection"
        )


class SilentReflection(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """Accepts reflection calls and never answers until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def ServerReflectionInfo(self, request_iterator: object, context: object) -> None:
        await self.release.wait()


async def test_reflection_that_does_not_answer_is_given_up_after_timeout() -> None:
    silent = SilentReflection()
    server = InProcessServer((reflection_pb2_grpc.add_ServerReflectionServicer_to_server, silent))
    address = await server.start()
    try:
        with pytest.raises(BadInput) as error:
            await method_from_reflection(address, PLACE_ORDER, timeout=1)
        assert str(error.value) == (
            f"server reflection at {address} did not answer within 1 s"
        )
    finally:
        silent.release.set()
        await server.stop()


# Request templates: placeholders


PLACE_ORDER_METHOD = method_from_stubs(PLACE_ORDER)


def _order(data: str, worker: int = 0, seed: int | None = 7) -> RequestTemplate:
    return RequestTemplate.parse(data, PLACE_ORDER_METHOD, worker, seed=seed)


def _decoded(template: RequestTemplate, n: int) -> orders_pb2.PlaceOrderRequest:
    (encoded,) = template.render(n)
    return orders_pb2.PlaceOrderRequest.FromString(encoded)


def _customer(text: str) -> str:
    return json.dumps({"customer_id": text, "lines": [{"item_id": "x", "quantity": 1}]})


def test_constant_template_encodes_once_and_returns_the_same_object() -> None:
    template = _order(ORDER)
    assert template.constant
    first = template.render(0)
    assert template.render(1) is first
    assert template.render(10_000) is first
    assert _decoded(template, 3) == json_format.Parse(ORDER, orders_pb2.PlaceOrderRequest())


def test_worker_is_fixed_per_template_so_the_template_stays_constant() -> None:
    template = _order(_customer("ada-{{worker}}"), worker=3)
    assert template.constant
    assert _decoded(template, 0).customer_id == "ada-3"


def test_call_number_in_text_and_in_a_number_field() -> None:
    template = _order(
        '{"customer_id": "c{{n}}", "lines": [{"item_id": "x", "quantity": "{{n}}"}]}'
    )
    assert not template.constant
    assert _decoded(template, 0).customer_id == "c0"
    call = _decoded(template, 41)
    assert (call.customer_id, call.lines[0].quantity) == ("c41", 41)


def test_several_placeholders_and_literal_text_in_one_value() -> None:
    template = _order(_customer("{{ n }}-w{{worker}}-{{choice only}}-{{randint 9 9}}!"), worker=2)
    assert _decoded(template, 4).customer_id == "4-w2-only-9!"


def test_braces_that_are_no_placeholder_stay_as_text() -> None:
    template = _order(_customer("{{ {{n}} }} {x}"))
    assert _decoded(template, 5).customer_id == "{{ 5 }} {x}"


def test_uuid_is_a_fresh_uuid4_on_every_call() -> None:
    template = _order('{"customer_id": "ada", "idempotency_key": "{{uuid}}"}')
    keys = [_decoded(template, n).idempotency_key for n in range(10_000)]
    assert len(set(keys)) == len(keys)
    assert all(uuid.UUID(key).version == 4 for key in keys)


def test_random_values_repeat_with_a_seed_and_differ_between_workers() -> None:
    data = '{"customer_id": "{{randint 0 1000000}}", "idempotency_key": "{{uuid}}"}'

    def calls(worker: int, seed: int | None) -> list[orders_pb2.PlaceOrderRequest]:
        template = _order(data, worker=worker, seed=seed)
        return [_decoded(template, n) for n in range(50)]

    assert calls(0, seed=1) == calls(0, seed=1)
    keys = {call.idempotency_key for call in calls(0, seed=1)}
    assert keys.isdisjoint(call.idempotency_key for call in calls(1, seed=1))
    assert keys.isdisjoint(call.idempotency_key for call in calls(0, seed=None))


def test_choice_picks_every_listed_value() -> None:
    template = _order(_customer("{{choice ada, grace ,linus}}"))
    seen = {_decoded(template, n).customer_id for n in range(300)}
    assert seen == {"ada", "grace", "linus"}


def test_randint_is_inclusive_and_fills_int32_and_int64_fields() -> None:
    template = _order(
        '{"customer_id": "ada", "lines": [{"item_id": "x", "quantity": "{{randint 1 3}}",'
        ' "unit_price_cents": "{{randint 5000000000 5000000002}}"}]}'
    )
    lines = [_decoded(template, n).lines[0] for n in range(300)]
    assert {line.quantity for line in lines} == {1, 2, 3}
    assert {line.unit_price_cents - 5_000_000_000 for line in lines} == {0, 1, 2}


def test_now_is_unix_time_in_milliseconds() -> None:
    template = _order(
        '{"customer_id": "{{now}}", "lines": [{"item_id": "x", "quantity": 1,'
        ' "unit_price_cents": "{{now}}"}]}'
    )
    before = time.time_ns() // 1_000_000
    call = _decoded(template, 0)
    after = time.time_ns() // 1_000_000
    assert before <= int(call.customer_id) <= after
    assert before <= call.lines[0].unit_price_cents <= after


def test_mixed_constant_and_templated_members_keep_their_order() -> None:
    template = _order(
        '{"customer_id": "ada", "idempotency_key": "k{{n}}", "lines": ['
        '{"item_id": "a", "quantity": "{{n}}"}, {"item_id": "b", "quantity": 9},'
        ' {"item_id": "c{{n}}", "quantity": 1}]}'
    )
    assert _decoded(template, 2) == orders_pb2.PlaceOrderRequest(
        customer_id="ada",
        idempotency_key="k2",
        lines=[
            orders_pb2.OrderLine(item_id="a", quantity=2),
            orders_pb2.OrderLine(item_id="b", quantity=9),
            orders_pb2.OrderLine(item_id="c2", quantity=1),
        ],
    )


# Scalar types and client streaming, on a message and service made for the test

_SCALARS_FILE = """
name: "loadtest/scalars.proto"
package: "loadtest"
syntax: "proto3"
dependency: "google/protobuf/wrappers.proto"
message_type {
  name: "Scalars"
  field { name: "i32" number: 1 type: TYPE_INT32 label: LABEL_OPTIONAL }
  field { name: "i64" number: 2 type: TYPE_INT64 label: LABEL_OPTIONAL }
  field { name: "u32" number: 3 type: TYPE_UINT32 label: LABEL_OPTIONAL }
  field { name: "u64" number: 4 type: TYPE_UINT64 label: LABEL_OPTIONAL }
  field { name: "dbl" number: 5 type: TYPE_DOUBLE label: LABEL_OPTIONAL }
  field { name: "flt" number: 6 type: TYPE_FLOAT label: LABEL_OPTIONAL }
  field { name: "flag" number: 7 type: TYPE_BOOL label: LABEL_OPTIONAL }
  field { name: "flag_list" number: 8 type: TYPE_BOOL label: LABEL_REPEATED }
  field {
    name: "flag_map" number: 9 type: TYPE_MESSAGE label: LABEL_REPEATED
    type_name: ".loadtest.Scalars.FlagMapEntry"
  }
  field {
    name: "wrapped_flag" number: 10 type: TYPE_MESSAGE label: LABEL_OPTIONAL
    type_name: ".google.protobuf.BoolValue"
  }
  field { name: "text" number: 11 type: TYPE_STRING label: LABEL_OPTIONAL }
  nested_type {
    name: "FlagMapEntry"
    options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_BOOL label: LABEL_OPTIONAL }
  }
}
service {
  name: "Load"
  method { name: "Unary" input_type: ".loadtest.Scalars" output_type: ".loadtest.Scalars" }
  method {
    name: "Upload" input_type: ".loadtest.Scalars" output_type: ".loadtest.Scalars"
    client_streaming: true
  }
}
"""


def _scalars_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(text_format.Parse(_SCALARS_FILE, descriptor_pb2.FileDescriptorProto()))
    return pool


_LOAD_SERVICE = _scalars_pool().FindServiceByName("loadtest.Load")
Scalars = message_factory.GetMessageClass(_LOAD_SERVICE.methods_by_name["Unary"].input_type)


def _load_method(name: str) -> MethodInfo:
    method = _LOAD_SERVICE.methods_by_name[name]
    return MethodInfo(
        path=f"/loadtest.Load/{name}",
        request_type=Scalars,
        response_type=Scalars,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


UNARY, UPLOAD = _load_method("Unary"), _load_method("Upload")


def _scalars(encoded: bytes) -> Message:
    return Scalars.FromString(encoded)


def test_proto3_json_takes_quoted_numbers_but_no_quoted_bool() -> None:
    """What the bool handling below is for."""
    message = json_format.ParseDict(
        {"i32": "-5", "i64": "-9000000000", "u32": "7", "u64": "18446744073709551615",
         "dbl": "2.5", "flt": "0.5"},
        Scalars(),
    )
    assert (message.i32, message.u64, message.dbl) == (-5, 2**64 - 1, 2.5)  # type: ignore[attr-defined]
    with pytest.raises(json_format.ParseError, match="flag"):
        json_format.ParseDict({"flag": "true"}, Scalars())


def test_placeholders_fill_every_numeric_type() -> None:
    template = RequestTemplate.parse(
        '{"i32": "{{randint -5 -5}}", "i64": "-{{n}}", "u32": "{{choice 7}}",'
        ' "u64": "{{choice 18446744073709551615}}", "dbl": "{{n}}.5", "flt": "{{choice 0.5}}"}',
        UNARY,
    )
    (encoded,) = template.render(9_000_000_000)
    assert json_format.MessageToDict(_scalars(encoded), preserving_proto_field_name=True) == {
        "i32": -5,
        "i64": "-9000000000",
        "u32": 7,
        "u64": "18446744073709551615",
        "dbl": 9000000000.5,
        "flt": 0.5,
    }


def test_placeholders_fill_bool_fields_lists_maps_and_wrappers_by_either_name() -> None:
    template = RequestTemplate.parse(
        '{"flag": "{{choice true}}", "flagList": ["{{choice false}}", "{{choice true}}"],'
        ' "flag_map": {"a": "{{choice true}}", "b": false}, "wrappedFlag": "{{choice true}}",'
        ' "text": "{{choice true}}"}',
        UNARY,
    )
    (encoded,) = template.render(0)
    assert json_format.MessageToDict(_scalars(encoded), preserving_proto_field_name=True) == {
        "flag": True,
        "flag_list": [False, True],
        "flag_map": {"a": True, "b": False},
        "wrapped_flag": True,
        "text": "true",
    }


def test_bool_field_placeholder_is_checked_for_every_choice() -> None:
    with pytest.raises(BadInput, match="flag"):
        RequestTemplate.parse('{"flag": "{{choice true,yes}}"}', UNARY)


def test_client_streaming_body_is_an_array_of_messages_in_order() -> None:
    template = RequestTemplate.parse(
        '[{"text": "first {{n}}"}, {"i32": 2}, {"text": "third", "u32": "{{n}}"}]', UPLOAD
    )
    assert not template.constant
    assert [_scalars(encoded) for encoded in template.render(4)] == [
        Scalars(text="first 4"),
        Scalars(i32=2),
        Scalars(text="third", u32=4),
    ]


def test_constant_client_stream_returns_the_same_object() -> None:
    template = RequestTemplate.parse('[{"text": "a"}, {"text": "b"}]', UPLOAD)
    assert template.constant
    assert template.render(0) is template.render(1)
    assert [_scalars(encoded).text for encoded in template.render(2)] == ["a", "b"]  # type: ignore[attr-defined]


def test_empty_client_stream_sends_no_messages() -> None:
    assert tuple(RequestTemplate.parse("[]", UPLOAD).render(0)) == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            '{"text": "a"}',
            "/loadtest.Load/Upload is client-streaming: the request must be a JSON array",
        ),
        ('[{"text": "a"}, "b"]', "message 1 of the request stream must be a JSON object"),
        (
            '[{"text": "a"}, {"txt": "b"}]',
            'the request does not fit loadtest.Scalars (message 1 of the stream): '
            'Message type "loadtest.Scalars" has no field named "txt"',
        ),
    ],
)
def test_client_streaming_body_errors(data: str, message: str) -> None:
    with pytest.raises(BadInput) as error:
        RequestTemplate.parse(data, UPLOAD)
    assert str(error.value).startswith(message)


def test_well_known_request_type_is_encoded_whole() -> None:
    struct_method = MethodInfo("/x.S/M", struct_pb2.Struct, struct_pb2.Struct, False, False)
    template = RequestTemplate.parse('{"a": "{{n}}", "b": 1, "c": {"d": ["{{n}}"]}}', struct_method)
    (encoded,) = template.render(3)
    assert json_format.MessageToDict(struct_pb2.Struct.FromString(encoded)) == {
        "a": "3",
        "b": 1,
        "c": {"d": ["3"]},
    }


# Request templates: bad input


def test_unary_body_must_be_an_object() -> None:
    with pytest.raises(BadInput) as error:
        _order("[" + ORDER + "]")
    assert str(error.value) == (
        "the request of /foodmesh.orders.v1.OrderService/PlaceOrder must be a JSON object"
        " (an array is for client-streaming methods only)"
    )


def test_bad_json_names_the_position() -> None:
    with pytest.raises(BadInput) as error:
        _order('{"customer_id": "ada",\n "lines": }')
    assert str(error.value) == (
        "the request is not valid JSON: Expecting value at line 2 column 11 (char 33)"
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"customer": "ada"}', '"customer"'),
        ('{"customer_id": "ada", "lines": [{"item": "x"}]}', '"item"'),
        ('{"lines": [{"item_id": "x", "quantity": "many"}]}', "quantity"),
        ('{"lines": [{"item_id": "x", "quantity": 1.5}]}', "quantity"),
        ('{"lines": {"item_id": "x"}}', "lines"),
        ('{"lines": [{"item_id": "x", "quantity": "q{{n}}"}]}', "quantity"),
        ('{"lines": [{"item_id": "x", "quantity": "{{choice 1,2,three}}"}]}', "quantity"),
        ('{"lines": [{"item_id": "x", "quantity": "{{randint 1 3000000000}}"}]}', "quantity"),
        ('{"customer_id": "{{uuid}}", "lines": [{"quantity": "{{uuid}}"}]}', "quantity"),
    ],
)
def test_request_that_does_not_fit_names_the_field(data: str, field: str) -> None:
    with pytest.raises(BadInput) as error:
        _order(data)
    message = str(error.value)
    assert message.startswith("the request does not fit foodmesh.orders.v1.PlaceOrderRequest: ")
    assert field in message


@pytest.mark.parametrize(
    ("placeholder", "message"),
    [
        ("{{uuid4}}", "unknown placeholder {{uuid4}} (known: {{n}}, {{worker}}, {{uuid}},"),
        ("{{}}", "unknown placeholder {{}}"),
        ("{{n 3}}", "placeholder {{n 3}} takes no arguments"),
        ("{{uuid v4}}", "placeholder {{uuid v4}} takes no arguments"),
        ("{{choice}}", "placeholder {{choice}} needs non-empty values"),
        ("{{choice a,,b}}", "placeholder {{choice a,,b}} needs non-empty values"),
        ("{{randint 5 1}}", "placeholder {{randint 5 1}}: LO is greater than HI"),
        ("{{randint 1}}", "placeholder {{randint 1}} needs two integers"),
        ("{{randint 1 2 3}}", "placeholder {{randint 1 2 3}} needs two integers"),
        ("{{randint a b}}", "placeholder {{randint a b}} needs two integers"),
    ],
)
def test_bad_placeholder_is_named(placeholder: str, message: str) -> None:
    with pytest.raises(BadInput) as error:
        _order(_customer("id-" + placeholder))
    assert str(error.value).startswith(message)
