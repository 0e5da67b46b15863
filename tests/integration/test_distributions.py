"""What `pip install` puts into site-packages: the two distributions are built from this
checkout as pip builds them, and their wheels hold exactly the packages the README promises
(the library, its building blocks and meshctl in one; only the foodmesh stubs in the other;
the demo services in neither)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.integration.conftest import PROJECT_ROOT

LEFT_OUT = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")


def built_wheel(source: Path, out: Path) -> zipfile.ZipFile:
    """The wheel pip builds from `source` (a copy: a build writes build/ and egg-info into
    the tree it builds). No build isolation: setuptools comes from the environment (a dev
    dependency), so the test needs no download."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def top_level(wheel: zipfile.ZipFile) -> set[str]:
    return {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, zipfile.ZipFile]:
    root = tmp_path_factory.mktemp("wheels")
    checkout = root / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, checkout / name)
    # services/ and scripts/ are copied too, so that leaving them out is the build's doing
    for name in ("mesh", "meshkit", "meshctl", "services", "scripts", "protos"):
        shutil.copytree(PROJECT_ROOT / name, checkout / name, ignore=LEFT_OUT)
    (root / "main").mkdir()
    (root / "protos").mkdir()
    return {
        "main": built_wheel(checkout, root / "main"),
        "protos": built_wheel(checkout / "protos", root / "protos"),
    }


def test_the_main_distribution_is_the_library_its_blocks_and_meshctl(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    wheel = wheels["main"]
    assert top_level(wheel) == {"mesh", "meshkit", "meshctl"}
    names = set(wheel.namelist())
    assert {"mesh/py.typed", "mesh/testing/__init__.py", "mesh/layers.py"} <= names
    assert "meshctl/load/__main__.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "meshctl = meshctl.cli:main" in wheel.read(entry_points).decode()


def test_the_stubs_distribution_is_the_foodmesh_namespace_only(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    wheel = wheels["protos"]
    assert top_level(wheel) == {"foodmesh"}
    names = set(wheel.namelist())
    # Every .proto of the source tree, with its generated code: a context whose package
    # lacks an __init__.py would silently be left out.
    protos = sorted((PROJECT_ROOT / "protos").glob("foodmesh/*/v1/*.proto"))
    assert len(protos) >= 9
    for proto in protos:
        stem = proto.relative_to(PROJECT_ROOT / "protos").with_suffix("").as_posix()
        for suffix in (".proto", "_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert f"{stem}{suffix}" in names
    assert "foodmesh/py.typed" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in wheel.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    # googleapis-common-protos: google/api/annotations.proto, which the HTTP mappings import
    assert sorted(line.split()[1].split(">")[0] for line in requires) == [
        "googleapis-common-protos",
        "grpcio",
        "protobuf",
    ]
