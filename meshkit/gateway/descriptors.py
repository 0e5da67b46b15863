"""The descriptors of every service in the mesh, fetched from the services' own reflection.

The gateway has no .proto files and no generated code of the services it routes. For each
Consul service in the route table it asks one instance, over that service's mesh channel,
for the files that define its gRPC services (server reflection's `file_containing_symbol`,
which answers with the file and everything it imports), and merges all of them into one
DescriptorPool. That pool is what merged reflection serves (meshkit/gateway/reflection.py),
what tells the router each method's call shape, and what the HTTP/JSON transcoder reads.

A service's files are fetched again when the `version` meta of its instances changes (a
rollout), and dropped when it leaves the table; a fetch that fails (no healthy instance yet,
a slow start) is retried with backoff. The pool is rebuilt from the files on every change and
swapped in whole, so a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh.core.backoff import ExponentialBackoff
from meshkit.gateway.routes import RouteTable

log = logging.getLogger(__name__)

ChannelFor = Callable[[str], aio.Channel]
SHAPES = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


class ReflectionFailed(Exception):
    """A service's reflection did not give the files of the services it registers."""


async def fetch_files(
    channel: aio.Channel, grpc_services: Iterable[str], *, timeout: float
) -> dict[str, bytes]:
    """The serialized FileDescriptorProtos (by file name) that define `grpc_services` and
    what they import, from the reflection of the service behind `channel`."""
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        for name in sorted(grpc_services)
    ]
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    files: dict[str, bytes] = {}
    call = stub.ServerReflectionInfo(iter(requests), timeout=timeout)
    async for response in call:
        if response.HasField("error_response"):
            raise ReflectionFailed(
                f"reflection has no {response.original_request.file_containing_symbol}: "
                f"{response.error_response.error_message}"
            )
        for serialized in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
            files[proto.name] = serialized
    return files


def build_pool(
    files: Mapping[str, bytes], own: Iterable[FileDescriptor] = ()
) -> descriptor_pool.DescriptorPool:
    """A pool of `files` (each after its imports) and the gateway's `own` files; a file whose
    imports are missing or that does not build is left out, with a warning."""
    pool = descriptor_pool.DescriptorPool()
    protos = {name: descriptor_pb2.FileDescriptorProto.FromString(b) for name, b in files.items()}
    for descriptor in _with_imports(own):
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        protos.setdefault(proto.name, proto)
    added: set[str] = set()
    failed: set[str] = set()

    def add(name: str, path: tuple[str, ...]) -> bool:
        if name in added:
            return True
        if name in failed or name in path or name not in protos:
            return False
        proto = protos[name]
        if not all(add(dep, (*path, name)) for dep in proto.dependency):
            log.warning("descriptors: %s left out, an import of it is missing", name)
            failed.add(name)
            return False
        try:
            pool.Add(proto)
        except (TypeError, ValueError) as exc:
            log.warning("descriptors: %s left out: %s", name, exc)
            failed.add(name)
            return False
        added.add(name)
        return True

    for name in sorted(protos):
        add(name, ())
    return pool


def _with_imports(files: Iterable[FileDescriptor]) -> list[FileDescriptor]:
    seen: dict[str, FileDescriptor] = {}
    pending = list(files)
    while pending:
        file = pending.pop()
        if file.name not in seen:
            seen[file.name] = file
            pending.extend(file.dependencies)
    return list(seen.values())


@dataclass
class _Loaded:
    versions: frozenset[str]
    grpc_services: frozenset[str]
    files: dict[str, bytes]


@dataclass
class MeshDescriptors:
    """The merged descriptors of the services in the route table, kept current."""

    channel_for: ChannelFor
    own: tuple[FileDescriptor, ...] = ()
    """The gateway's own services' files (health, reflection), always in the pool."""
    timeout: float = 5.0
    backoff: ExponentialBackoff = ExponentialBackoff(0.25, 5.0)
    rng: Callable[[], float] = random.random
    pool: descriptor_pool.DescriptorPool = field(init=False)
    _loaded: dict[str, _Loaded] = field(default_factory=dict, init=False)
    _shapes: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.pool = build_pool({}, self.own)

    def shape_of(self, method: str) -> str | None:
        """`unary_unary`, ..., for `/pkg.Service/Method`; None when it is not known."""
        return self._shapes.get(method)

    def loaded(self, consul_service: str) -> frozenset[str] | None:
        """The versions whose descriptors are loaded for `consul_service` (None: none are)."""
        found = self._loaded.get(consul_service)
        return found.versions if found is not None else None

    async def refresh(self, table: RouteTable) -> bool:
        """Fetch what `table` needs and is not loaded, drop what it no longer routes, and
        swap in the new pool; True when every service's descriptors are loaded."""
        wanted: dict[str, tuple[frozenset[str], set[str]]] = {}
        for route in table.routes.values():
            versions, names = wanted.setdefault(route.consul_service, (route.versions, set()))
            names.add(route.grpc_service)
        stale = [
            (consul, versions, frozenset(names))
            for consul, (versions, names) in wanted.items()
            if (held := self._loaded.get(consul)) is None
            or held.versions != versions
            or held.grpc_services != names
        ]
        gone = [consul for consul in self._loaded if consul not in wanted]
        for consul in gone:
            del self._loaded[consul]
        results = await asyncio.gather(
            *(self._fetch(consul, names) for consul, _, names in stale), return_exceptions=True
        )
        complete = True
        fetched = False
        for (consul, versions, served), result in zip(stale, results, strict=True):
            if isinstance(result, BaseException):
                complete = False
                log.info("descriptors of %r not loaded yet: %s", consul, _reason(result))
                continue
            self._loaded[consul] = _Loaded(versions, served, result)
            fetched = True
            log.info(
                "descriptors of %r (%s), version %s: %d file(s)",
                consul,
                ", ".join(sorted(served)),
                ", ".join(sorted(versions)) or "?",
                len(result),
            )
        if fetched or gone:
            self._rebuild()
        return complete

    async def follow(self, tables: AsyncIterator[RouteTable]) -> None:
        """Refresh on every table from `tables`, and retry a failed fetch with backoff until
        it succeeds or a newer table comes."""
        table: RouteTable | None = None
        nxt: asyncio.Task[RouteTable] | None = None
        failures = 0
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(anext(tables))
                if table is not None and not await self._refreshed(table):
                    failures += 1
                    delay = max(self.backoff.delay(failures, self.rng), 0.05)
                    done, _ = await asyncio.wait({nxt}, timeout=delay)
                    if not done:
                        continue
                else:
                    failures = 0
                    await asyncio.wait({nxt})
                table, nxt = nxt.result(), None
                failures = 0
        except StopAsyncIteration:
            return
        finally:
            if nxt is not None:
                nxt.cancel()

    async def _refreshed(self, table: RouteTable) -> bool:
        """refresh(), with a failure of its own logged and retried like a failed fetch: the
        loop that keeps routes current must not end on a bad descriptor."""
        try:
            return await self.refresh(table)
        except Exception:
            log.exception("descriptors: refreshing failed; trying again")
            return False

    async def _fetch(self, consul_service: str, grpc_services: frozenset[str]) -> dict[str, bytes]:
        channel = self.channel_for(consul_service)
        return await fetch_files(channel, grpc_services, timeout=self.timeout)

    def _rebuild(self) -> None:
        files: dict[str, bytes] = {}
        for consul in sorted(self._loaded):
            for name, serialized in self._loaded[consul].files.items():
                if files.setdefault(name, serialized) != serialized:
                    log.warning("descriptors: %s differs between services; keeping the first", name)
        pool = build_pool(files, self.own)
        shapes = {}
        for loaded in self._loaded.values():
            for name in loaded.grpc_services:
                try:
                    service = pool.FindServiceByName(name)
                except KeyError:
                    log.warning("descriptors: %s is registered but its reflection lacks it", name)
                    continue
                for method in service.methods:
                    shape = SHAPES[(method.client_streaming, method.server_streaming)]
                    shapes[f"/{name}/{method.name}"] = shape
        self.pool, self._shapes = pool, shapes


def _reason(error: BaseException) -> str:
    if isinstance(error, aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
