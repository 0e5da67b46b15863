"""CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN are read as the consul CLI reads them."""

from __future__ import annotations

import pytest

from mesh.discovery import ConsulSettings, Endpoint


def test_defaults_when_unset() -> None:
    settings = ConsulSettings.from_env({})
    assert (settings.host, settings.port, settings.scheme, settings.token) == (
        "127.0.0.1",
        8500,
        "http",
        None,
    )


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("10.1.2.3:8501", ("10.1.2.3", 8501, "http")),
        ("http://consul.local:9000", ("consul.local", 9000, "http")),
        ("https://consul.local", ("consul.local", 443, "https")),
        ("consul.local", ("consul.local", 8500, "http")),
        ("[::1]:8500", ("::1", 8500, "http")),
    ],
)
def test_addr_forms(addr: str, expected: tuple[str, int, str]) -> None:
    settings = ConsulSettings.from_env({"CONSUL_HTTP_ADDR": addr, "CONSUL_HTTP_TOKEN": "s3cr3t"})
    assert (settings.host, settings.port, settings.scheme) == expected
    assert settings.token == "s3cr3t"
    assert "s3cr3t" not in repr(settings), "the token never shows up in logs"


@pytest.mark.parametrize(
    "addr", ["http://host:notaport", "ftp://host:1", "http://:8500", "host:70000"]
)
def test_bad_addr_is_refused_naming_the_variable(addr: str) -> None:
    with pytest.raises(ValueError, match="CONSUL_HTTP_ADDR"):
        ConsulSettings.from_env({"CONSUL_HTTP_ADDR": addr})


def test_endpoint_addresses() -> None:
    assert Endpoint.parse("10.0.0.1:50051").address == "10.0.0.1:50051"
    assert Endpoint.parse("[::1]:50051").address == "[::1]:50051"
    assert Endpoint("::1", 1) == Endpoint("::1", 1, instance_id="other")
    with pytest.raises(ValueError, match="host:port"):
        Endpoint.parse("no-port")
    with pytest.raises(ValueError, match="port"):
        Endpoint("h", 0)
