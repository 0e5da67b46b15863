"""Regenerate the Python code of every .proto file under protos/, or check that it is current.

The generated code is committed, next to its .proto, so that the package installs and imports
without protoc; this script is the one way to produce it, and its --check mode is how tests and
CI notice code that has drifted from the .proto files.

    python scripts/gen_protos.py            # rewrite the generated files in place
    python scripts/gen_protos.py --check    # exit 1 listing stale, missing and orphaned files

Each foo.proto yields foo_pb2.py and foo_pb2_grpc.py (grpcio-tools) and their stubs foo_pb2.pyi
and foo_pb2_grpc.pyi (mypy-protobuf, with grpc.aio types). protos/ is the include root, so the
generated imports are absolute package imports (``from foodmesh.catalog.v1 import catalog_pb2``).
Both modes generate into a temporary directory first and compare, so a write touches only the
files whose content changed, and removes generated files that no .proto produces any more.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
"""The source root of this checkout: protos/foodmesh/... is package foodmesh."""

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
"""How the name of every file this script generates ends."""


class ProtocError(RuntimeError):
    """protoc, or one of its plugins, could not be run or rejected a .proto file."""


@dataclass(frozen=True)
class Drift:
    """How the generated files under a source root differ from freshly generated ones.

    Paths are relative to the source root.
    """

    stale: tuple[Path, ...]
    """Files whose content differs from what the .proto files produce now."""
    missing: tuple[Path, ...]
    """Files that the .proto files produce but that do not exist."""
    orphaned: tuple[Path, ...]
    """Generated-looking files that no .proto file produces."""

    @property
    def is_clean(self) -> bool:
        """True when the generated files are exactly what the .proto files produce."""
        return not (self.stale or self.missing or self.orphaned)

    def describe(
        self, root: Path, labels: Sequence[str] = ("stale", "missing", "orphaned")
    ) -> list[str]:
        """One line per file that differs, e.g. ``stale: protos/foodmesh/x/v1/x_pb2.py``.

        labels name the three kinds of difference, in the order stale, missing, orphaned.
        """
        kinds = zip(labels, (self.stale, self.missing, self.orphaned), strict=True)
        return [f"{label}: {_display(root / path)}" for label, paths in kinds for path in paths]


BUILD_OUTPUT = ("build", "dist")
"""Folders under the source root that a wheel build of protos/ writes copies into."""


def _is_source(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return parts[0] not in BUILD_OUTPUT and not any(p.endswith(".egg-info") for p in parts)


def find_protos(root: Path) -> list[Path]:
    """Every .proto file under root (not in build output), relative to it, sorted."""
    found = (path for path in root.rglob("*.proto") if _is_source(path, root))
    return sorted(path.relative_to(root) for path in found)


def include_args(root: Path) -> list[str]:
    """protoc's --proto_path arguments: root first, then grpc_tools' bundled well-known types,
    then googleapis-common-protos' (google/api/annotations.proto, for the HTTP mappings)."""
    well_known = resources.files("grpc_tools") / "_proto"
    annotations = importlib.util.find_spec("google.api.annotations_pb2")
    assert annotations is not None and annotations.origin, "googleapis-common-protos is missing"
    googleapis = Path(annotations.origin).parents[2]
    return [
        f"--proto_path={root.resolve()}",
        f"--proto_path={well_known}",
        f"--proto_path={googleapis}",
    ]


def generate(root: Path, out_dir: Path) -> None:
    """Generate the Python code and stubs of every .proto under root into out_dir.

    Raises ProtocError if a plugin is missing or protoc fails (its messages go to stderr).
    """
    root = root.resolve()
    sources = find_protos(root)
    if not sources:
        return
    args = [
        "grpc_tools.protoc",
        *include_args(root),
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--mypy_out=quiet:{out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *(str(root / source) for source in sources),
    ]
    status = protoc.main(args)
    if status != 0:
        raise ProtocError(f"protoc failed with status {status} on the .proto files under {root}")


def check(root: Path = PROTO_ROOT) -> Drift:
    """Compare the generated files under root with what its .proto files produce now."""
    with tempfile.TemporaryDirectory(prefix="gen_protos-") as tmp:
        fresh_dir = Path(tmp)
        generate(root, fresh_dir)
        return _compare(fresh_dir, root)


def write(root: Path = PROTO_ROOT) -> Drift:
    """Bring the generated files under root up to date; return what was changed."""
    with tempfile.TemporaryDirectory(prefix="gen_protos-") as tmp:
        fresh_dir = Path(tmp)
        generate(root, fresh_dir)
        drift = _compare(fresh_dir, root)
        for path in drift.stale + drift.missing:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((fresh_dir / path).read_bytes())
        for path in drift.orphaned:
            (root / path).unlink()
        return drift


def _compare(fresh_dir: Path, root: Path) -> Drift:
    fresh = _generated_files(fresh_dir)
    present = _generated_files(root)
    return Drift(
        stale=tuple(
            path
            for path in sorted(fresh & present)
            if (fresh_dir / path).read_bytes() != (root / path).read_bytes()
        ),
        missing=tuple(sorted(fresh - present)),
        orphaned=tuple(sorted(present - fresh)),
    )


def _generated_files(directory: Path) -> set[Path]:
    return {
        path.relative_to(directory)
        for path in directory.rglob("*_pb2*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES) and _is_source(path, directory)
    }


def _plugin(name: str) -> str:
    """The path of a protoc plugin installed by mypy-protobuf, next to this Python first."""
    found = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if found is None:
        raise ProtocError(f"{name} not found: install mypy-protobuf (pip install -e '.[dev]')")
    return found


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any generated file is stale, missing or orphaned",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=PROTO_ROOT,
        help="the .proto source root (default: protos/ of this checkout)",
    )
    options = parser.parse_args(argv)
    root: Path = options.root
    try:
        drift = check(root) if options.check else write(root)
    except ProtocError as error:
        print(f"gen_protos: {error}", file=sys.stderr)
        return 2
    if not options.check:
        for line in drift.describe(root, labels=("updated", "created", "removed")):
            print(line)
        return 0
    if drift.is_clean:
        return 0
    for line in drift.describe(root):
        print(line, file=sys.stderr)
    print("generated code is out of date: run python scripts/gen_protos.py", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
