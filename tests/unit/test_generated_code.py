"""The committed generated code matches the .proto files, and the API contracts hold.

The generated code is committed so that the package installs without protoc; a .proto edit
without `python scripts/gen_protos.py` would ship code that disagrees with its schema. The
descriptor checks pin what clients and the mesh rely on: field names and types, and which RPCs
are safe to retry (idempotency_level), since retry policy reads it.
"""

from __future__ import annotations

import importlib.resources
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor
from google.protobuf.message import Message
from grpc_tools import protoc

from foodmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from scripts import gen_protos

NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
IDEMPOTENCY_UNKNOWN = descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN
STRING, INT32, INT64, BOOL, MESSAGE, ENUM = (
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_MESSAGE,
    FieldDescriptor.TYPE_ENUM,
)

SourcePaths = Iterator[tuple[str, tuple[int, ...]]]
"""(name, path in the file's SourceCodeInfo) of documentable elements."""


def test_generated_code_is_current() -> None:
    drift = gen_protos.check(gen_protos.PROTO_ROOT)
    assert drift.is_clean, "\n".join(
        [*drift.describe(gen_protos.PROTO_ROOT), "run: python scripts/gen_protos.py"]
    )


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of protos/ (sources and generated code) that a test may damage."""
    root = tmp_path / "protos"
    shutil.copytree(gen_protos.PROTO_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_check_reports_stale_missing_and_orphaned_files(proto_copy: Path) -> None:
    catalog_proto = proto_copy / "foodmesh/catalog/v1/catalog.proto"
    source = catalog_proto.read_text()
    assert "  bool available = 7;\n" in source
    catalog_proto.write_text(
        source.replace(
            "  bool available = 7;\n", "  bool available = 7;\n  string photo_url = 8;\n"
        )
    )
    (proto_copy / "foodmesh/orders/v1/orders_pb2_grpc.pyi").unlink()
    orphan = proto_copy / "foodmesh/menus/v1/menus_pb2.py"
    orphan.parent.mkdir(parents=True)
    orphan.write_text("# left behind by a deleted menus.proto\n")

    drift = gen_protos.check(proto_copy)

    assert drift.stale == (
        Path("foodmesh/catalog/v1/catalog_pb2.py"),
        Path("foodmesh/catalog/v1/catalog_pb2.pyi"),
    )
    assert drift.missing == (Path("foodmesh/orders/v1/orders_pb2_grpc.pyi"),)
    assert drift.orphaned == (Path("foodmesh/menus/v1/menus_pb2.py"),)

    assert gen_protos.write(proto_copy) == drift
    assert gen_protos.check(proto_copy).is_clean
    assert not orphan.exists()
    assert "photo_url" in (proto_copy / "foodmesh/catalog/v1/catalog_pb2.pyi").read_text()


def test_check_command_exits_1_and_lists_each_file(
    proto_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gen_protos.main(["--check", "--root", str(proto_copy)]) == 0
    (proto_copy / "foodmesh/catalog/v1/catalog_pb2_grpc.py").write_text("# edited by hand\n")
    (proto_copy / "foodmesh/catalog/v1/catalog_pb2.pyi").unlink()

    assert gen_protos.main(["--check", "--root", str(proto_copy)]) == 1

    errors = capsys.readouterr().err
    assert "stale: " in errors and "catalog_pb2_grpc.py" in errors
    assert "missing: " in errors and "catalog_pb2.pyi" in errors


@pytest.mark.parametrize(
    ("file", "service", "method", "level"),
    [
        (catalog_pb2.DESCRIPTOR, "CatalogService", "GetItem", NO_SIDE_EFFECTS),
        (catalog_pb2.DESCRIPTOR, "CatalogService", "ListItems", NO_SIDE_EFFECTS),
        (orders_pb2.DESCRIPTOR, "OrderService", "GetOrder", NO_SIDE_EFFECTS),
        (orders_pb2.DESCRIPTOR, "OrderService", "PlaceOrder", IDEMPOTENCY_UNKNOWN),
    ],
)
def test_idempotency_level(file: FileDescriptor, service: str, method: str, level: int) -> None:
    options = file.services_by_name[service].methods_by_name[method].GetOptions()
    assert options.idempotency_level == level


@pytest.mark.parametrize(
    ("file", "service", "method", "request_type", "response_type"),
    [
        (catalog_pb2.DESCRIPTOR, "CatalogService", "GetItem", "GetItemRequest", "Item"),
        (
            catalog_pb2.DESCRIPTOR,
            "CatalogService",
            "ListItems",
            "ListItemsRequest",
            "ListItemsResponse",
        ),
        (orders_pb2.DESCRIPTOR, "OrderService", "PlaceOrder", "PlaceOrderRequest", "Order"),
        (orders_pb2.DESCRIPTOR, "OrderService", "GetOrder", "GetOrderRequest", "Order"),
    ],
)
def test_rpc_signature(
    file: FileDescriptor, service: str, method: str, request_type: str, response_type: str
) -> None:
    rpc = file.services_by_name[service].methods_by_name[method]
    assert rpc.input_type.full_name == f"{file.package}.{request_type}"
    assert rpc.output_type.full_name == f"{file.package}.{response_type}"
    assert not rpc.client_streaming and not rpc.server_streaming


def test_packages_are_versioned() -> None:
    assert catalog_pb2.DESCRIPTOR.package == "foodmesh.catalog.v1"
    assert catalog_pb2.DESCRIPTOR.name == "foodmesh/catalog/v1/catalog.proto"
    assert orders_pb2.DESCRIPTOR.package == "foodmesh.orders.v1"
    assert orders_pb2.DESCRIPTOR.name == "foodmesh/orders/v1/orders.proto"


# (message, field, type, repeated, message or enum type of the field or None)
REQUIRED_FIELDS = [
    (catalog_pb2.GetItemRequest, "item_id", STRING, False, None),
    (catalog_pb2.ListItemsRequest, "restaurant_id", STRING, False, None),
    (catalog_pb2.ListItemsRequest, "page_size", INT32, False, None),
    (catalog_pb2.ListItemsRequest, "page_token", STRING, False, None),
    (catalog_pb2.ListItemsResponse, "items", MESSAGE, True, "foodmesh.catalog.v1.Item"),
    (catalog_pb2.ListItemsResponse, "next_page_token", STRING, False, None),
    (catalog_pb2.Item, "item_id", STRING, False, None),
    (catalog_pb2.Item, "restaurant_id", STRING, False, None),
    (catalog_pb2.Item, "name", STRING, False, None),
    (catalog_pb2.Item, "description", STRING, False, None),
    (catalog_pb2.Item, "price_cents", INT64, False, None),
    (catalog_pb2.Item, "currency", STRING, False, None),
    (catalog_pb2.Item, "available", BOOL, False, None),
    (orders_pb2.OrderLine, "item_id", STRING, False, None),
    (orders_pb2.OrderLine, "quantity", INT32, False, None),
    (orders_pb2.OrderLine, "unit_price_cents", INT64, False, None),
    (orders_pb2.PlaceOrderRequest, "customer_id", STRING, False, None),
    (orders_pb2.PlaceOrderRequest, "lines", MESSAGE, True, "foodmesh.orders.v1.OrderLine"),
    (orders_pb2.PlaceOrderRequest, "idempotency_key", STRING, False, None),
    (orders_pb2.GetOrderRequest, "order_id", STRING, False, None),
    (orders_pb2.Order, "order_id", STRING, False, None),
    (orders_pb2.Order, "customer_id", STRING, False, None),
    (orders_pb2.Order, "lines", MESSAGE, True, "foodmesh.orders.v1.OrderLine"),
    (orders_pb2.Order, "total_cents", INT64, False, None),
    (orders_pb2.Order, "currency", STRING, False, None),
    (orders_pb2.Order, "status", ENUM, False, "foodmesh.orders.v1.OrderStatus"),
    (orders_pb2.Order, "create_time", MESSAGE, False, "google.protobuf.Timestamp"),
]


@pytest.mark.parametrize(
    ("message", "name", "field_type", "repeated", "type_name"),
    REQUIRED_FIELDS,
    ids=[f"{message.__name__}.{name}" for message, name, *_ in REQUIRED_FIELDS],
)
def test_required_field(
    message: type[Message], name: str, field_type: int, repeated: bool, type_name: str | None
) -> None:
    field = message.DESCRIPTOR.fields_by_name[name]
    assert field.type == field_type
    assert field.is_repeated == repeated
    referenced = field.message_type or field.enum_type
    assert (referenced.full_name if referenced else None) == type_name


def test_order_status_values() -> None:
    status = orders_pb2.OrderStatus
    assert status.DESCRIPTOR.values_by_number[0].name == "ORDER_STATUS_UNSPECIFIED"
    assert status.Value("ORDER_STATUS_PLACED") == 1
    for later in ("CONFIRMED", "DELIVERED", "CANCELLED"):
        assert f"ORDER_STATUS_{later}" in status.keys()


def test_generated_grpc_modules_define_stub_servicer_and_registration() -> None:
    for module, service in (
        (catalog_pb2_grpc, "CatalogService"),
        (orders_pb2_grpc, "OrderService"),
    ):
        for name in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
            assert hasattr(module, name), f"{module.__name__}.{name}"


@pytest.mark.parametrize(
    ("package", "name"),
    [("foodmesh.catalog.v1", "catalog.proto"), ("foodmesh.orders.v1", "orders.proto")],
)
def test_proto_files_are_package_resources(package: str, name: str) -> None:
    resource = importlib.resources.files(package) / name
    assert resource.is_file()
    assert f"package {package};" in resource.read_text(encoding="utf-8")


def _source_info_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every .proto under protos/, parsed by protoc with its comments."""
    root = gen_protos.PROTO_ROOT
    out = tmp_path / "descriptors.pb"
    args = [
        "grpc_tools.protoc",
        *gen_protos.include_args(root),
        f"--descriptor_set_out={out}",
        "--include_source_info",
        *(str(root / source) for source in gen_protos.find_protos(root)),
    ]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _documentable(file: descriptor_pb2.FileDescriptorProto) -> SourcePaths:
    """Every service, RPC, message, field, enum and enum value of file."""
    numbers = descriptor_pb2.FileDescriptorProto
    for i, message in enumerate(file.message_type):
        yield from _message_elements(message, (numbers.MESSAGE_TYPE_FIELD_NUMBER, i))
    for i, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, (numbers.ENUM_TYPE_FIELD_NUMBER, i))
    for i, service in enumerate(file.service):
        path = (numbers.SERVICE_FIELD_NUMBER, i)
        yield service.name, path
        for j, method in enumerate(service.method):
            method_path = (*path, descriptor_pb2.ServiceDescriptorProto.METHOD_FIELD_NUMBER, j)
            yield f"{service.name}.{method.name}", method_path


def _message_elements(
    message: descriptor_pb2.DescriptorProto, path: tuple[int, ...]
) -> SourcePaths:
    numbers = descriptor_pb2.DescriptorProto
    yield message.name, path
    for i, field in enumerate(message.field):
        yield f"{message.name}.{field.name}", (*path, numbers.FIELD_FIELD_NUMBER, i)
    for i, nested in enumerate(message.nested_type):
        yield from _message_elements(nested, (*path, numbers.NESTED_TYPE_FIELD_NUMBER, i))
    for i, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, (*path, numbers.ENUM_TYPE_FIELD_NUMBER, i))


def _enum_elements(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]) -> SourcePaths:
    yield enum.name, path
    value_number = descriptor_pb2.EnumDescriptorProto.VALUE_FIELD_NUMBER
    for i, value in enumerate(enum.value):
        yield f"{enum.name}.{value.name}", (*path, value_number, i)


def _enums(
    messages: Iterable[descriptor_pb2.DescriptorProto],
) -> Iterator[descriptor_pb2.EnumDescriptorProto]:
    for message in messages:
        yield from message.enum_type
        yield from _enums(message.nested_type)


def test_every_element_has_a_comment_and_every_enum_starts_unspecified(tmp_path: Path) -> None:
    undocumented = []
    bad_enums = []
    for file in _source_info_set(tmp_path).file:
        if not file.name.startswith("foodmesh/"):
            continue
        commented = {
            tuple(location.path)
            for location in file.source_code_info.location
            if location.leading_comments.strip()
        }
        undocumented += [
            f"{file.name}: {name}" for name, path in _documentable(file) if path not in commented
        ]
        bad_enums += [
            f"{file.name}: {e.name}"
            for e in [*file.enum_type, *_enums(file.message_type)]
            if not e.value[0].name.endswith("_UNSPECIFIED") or e.value[0].number != 0
        ]
    assert not undocumented, "no leading comment:\n" + "\n".join(undocumented)
    assert not bad_enums, "enum whose zero value is not *_UNSPECIFIED:\n" + "\n".join(bad_enums)
