"""`meshctl prometheus-sd` without a real Consul: health entries to target groups, the atomic
file, the watch against an in-memory Consul with blocking queries, the HTTP endpoint, and the
command line's errors (bad flags, no agent)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshctl.cli import main, parse_listen
from meshctl.prometheus_sd.publish import HttpSdEndpoint
from meshctl.prometheus_sd.targets import render, target_group, target_groups, write_atomically
from meshctl.prometheus_sd.watch import Passing, PassingWatch, read_passing
from scripts.processes import free_tcp_port, wait_until_async


def entry(
    instance_id: str,
    *,
    metrics_port: int | str | None = 9100,
    address: str = "10.0.0.5",
    node: str = "host-a",
    node_address: str = "10.0.0.1",
    version: str | None = "1.2.0",
) -> dict[str, Any]:
    """A /v1/health/service entry as Consul 1.8 answers it (the fields that matter)."""
    meta = {"grpc_services": "foodmesh.catalog.v1.CatalogService", "pid": "42"}
    if metrics_port is not None:
        meta["metrics_port"] = str(metrics_port)
    if version is not None:
        meta["version"] = version
    return {
        "Node": {"Node": node, "Address": node_address},
        "Service": {"ID": instance_id, "Address": address, "Port": 50051, "Meta": meta},
        "Checks": [],
    }


# --- health entries -> target groups -------------------------------------------------------


def test_an_instance_is_its_metrics_address_with_its_labels() -> None:
    assert target_group("catalog", entry("catalog-1")) == {
        "targets": ["10.0.0.5:9100"],
        "labels": {
            "consul_service": "catalog",
            "instance": "catalog-1",
            "node": "host-a",
            "version": "1.2.0",
        },
    }


def test_no_target_label_hides_a_metric_label() -> None:
    """The call metrics carry `service` (on a client, the service called): a target label of
    that name would rename theirs to `exported_service`."""
    group = target_group("orders", entry("orders-1"))
    assert group is not None and "service" not in group["labels"]


def test_the_node_address_serves_when_the_service_has_none() -> None:
    group = target_group("catalog", entry("catalog-1", address=""))
    assert group is not None and group["targets"] == ["10.0.0.1:9100"]


def test_an_ipv6_address_is_bracketed() -> None:
    group = target_group("catalog", entry("catalog-1", address="fd00::5"))
    assert group is not None and group["targets"] == ["[fd00::5]:9100"]


def test_no_version_meta_means_no_version_label() -> None:
    group = target_group("catalog", entry("catalog-1", version=None))
    assert group is not None and "version" not in group["labels"]


def test_an_instance_without_metrics_port_is_no_target() -> None:
    assert target_group("consul", entry("consul", metrics_port=None)) is None


@pytest.mark.parametrize("port", ["nine", "0", "70000"])
def test_a_malformed_metrics_port_is_skipped_with_a_warning(
    port: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert target_group("catalog", entry("catalog-9", metrics_port=port)) is None
    assert "catalog-9 (catalog)" in caplog.text


def test_groups_of_every_service_in_a_stable_order() -> None:
    passing = {
        "users": [entry("users-2", metrics_port=9202), entry("users-1", metrics_port=9201)],
        "consul": [entry("consul", metrics_port=None)],
        "catalog": [entry("catalog-1", metrics_port=9101)],
    }
    groups = target_groups(passing)
    assert [(g["labels"]["consul_service"], g["labels"]["instance"]) for g in groups] == [
        ("catalog", "catalog-1"),
        ("users", "users-1"),
        ("users", "users-2"),
    ]
    reordered = dict(reversed(list(passing.items())))
    assert render(target_groups(reordered)) == render(groups)


def test_the_text_is_prometheus_sd_json() -> None:
    text = render(target_groups({"catalog": [entry("catalog-1")]}))
    assert text.endswith("\n")
    (group,) = json.loads(text)
    assert set(group) == {"targets", "labels"}
    assert all(isinstance(target, str) for target in group["targets"])
    assert all(isinstance(value, str) for value in group["labels"].values())
    assert render([]) == "[]\n"  # no instance: an empty list, which both discoveries accept


# --- the atomic file -------------------------------------------------------------------------


def test_the_file_is_replaced_whole_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    path.write_text("old")
    write_atomically(path, "[]\n")
    assert path.read_text() == "[]\n"
    assert list(tmp_path.iterdir()) == [path], "no temporary file left"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_the_temporary_file_matches_no_json_pattern(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def replace(source: str, target: Path) -> None:
        seen.append(os.path.basename(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    write_atomically(tmp_path / "targets.json", "[]\n")
    (name,) = seen
    assert name.startswith(".") and not name.endswith(".json")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "targets.json"
    path.write_text("old")

    def fail(source: str, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomically(path, "[]\n")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


# --- the watch, against an in-memory Consul ---------------------------------------------------


class FakeConsul:
    """Consul's two reads with blocking queries on one index, as a dev agent keeps it: a
    query at the current index waits until something changes."""

    def __init__(self, passing: Mapping[str, list[dict[str, Any]]]) -> None:
        self.passing: Passing = {name: list(entries) for name, entries in passing.items()}
        self.index = 10
        self.down = False
        self.held: dict[str, asyncio.Event] = {}
        """Services whose health answers wait until their event is set (a slow query)."""
        self.answered: list[str] = []
        self._changed = asyncio.Condition()

    async def change(self, service: str, entries: list[Mapping[str, Any]] | None) -> None:
        """Set a service's passing instances (None: the service is gone from the catalog)."""
        if entries is None:
            self.passing.pop(service, None)
        else:
            self.passing[service] = entries
        await self._bump()

    async def set_down(self, down: bool) -> None:
        self.down = down
        await self._bump()

    async def _bump(self) -> None:
        async with self._changed:
            self.index += 1
            self._changed.notify_all()

    async def _answer_after(self, index: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.index != index or self.down)
        if self.down:
            raise aiohttp.ClientConnectionError("connection refused")

    async def services(self, index: int, wait: float) -> tuple[int, Mapping[str, Any]]:
        await self._answer_after(index)
        return self.index, {name: [] for name in self.passing}

    async def health(self, service: str, index: int, wait: float) -> tuple[int, list[Any]]:
        await self._answer_after(index)
        if service in self.held:
            await self.held[service].wait()
        self.answered.append(service)
        return self.index, list(self.passing.get(service, []))


async def _no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


class Snapshots:
    """The watch running in a task; `until(expected)` waits for that snapshot."""

    def __init__(self, consul: FakeConsul) -> None:
        self.seen: list[Passing] = []
        self._queue: asyncio.Queue[Passing] = asyncio.Queue()
        watch = PassingWatch(consul.services, consul.health, sleep=_no_sleep)
        self._task = asyncio.create_task(self._run(watch))

    async def _run(self, watch: PassingWatch) -> None:
        async for passing in watch:
            self.seen.append(passing)
            await self._queue.put(passing)

    async def until(self, expected: Mapping[str, Any]) -> None:
        async with asyncio.timeout(5):
            while await self._queue.get() != expected:
                pass

    async def close(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def catalog() -> AsyncIterator[tuple[FakeConsul, Snapshots]]:
    consul = FakeConsul({"catalog": [entry("catalog-1")], "users": [entry("users-1")]})
    snapshots = Snapshots(consul)
    try:
        yield consul, snapshots
    finally:
        await snapshots.close()


async def test_no_snapshot_until_every_listed_service_answered() -> None:
    consul = FakeConsul({"catalog": [entry("catalog-1")], "users": [entry("users-1")]})
    consul.held["users"] = asyncio.Event()
    snapshots = Snapshots(consul)
    try:
        await wait_until_async(
            lambda: "catalog" in consul.answered, timeout=5, message="catalog not asked"
        )
        for _ in range(20):  # let the watch handle catalog's answer: loop turns, no waiting
            await asyncio.sleep(0)
        assert snapshots.seen == []
        consul.held["users"].set()
        await snapshots.until(consul.passing)
        assert snapshots.seen[0] == consul.passing
    finally:
        await snapshots.close()


async def test_instances_and_services_come_and_go(catalog: tuple[FakeConsul, Snapshots]) -> None:
    consul, snapshots = catalog
    await snapshots.until(consul.passing)
    await consul.change("catalog", [entry("catalog-1"), entry("catalog-2")])
    await snapshots.until(consul.passing)
    await consul.change("orders", [entry("orders-1")])
    await snapshots.until(consul.passing)
    await consul.change("catalog", [entry("catalog-2")])  # catalog-1's check fails
    await snapshots.until(consul.passing)
    await consul.change("users", None)  # its last instance deregistered
    await snapshots.until({"catalog": [entry("catalog-2")], "orders": [entry("orders-1")]})
    for passing in snapshots.seen:
        assert passing.keys() >= {"catalog"}, "a listed service was never missing"


async def test_an_outage_keeps_the_last_snapshot_and_recovers(
    catalog: tuple[FakeConsul, Snapshots], caplog: pytest.LogCaptureFixture
) -> None:
    consul, snapshots = catalog
    await snapshots.until(consul.passing)
    seen = len(snapshots.seen)
    with caplog.at_level(logging.INFO):
        await consul.set_down(True)
        await wait_until_async(  # the list's watch and both services' watches
            lambda: caplog.text.count("keeping the last answer") == 3,
            timeout=5,
            message="the watches did not see the outage",
        )
        assert len(snapshots.seen) == seen, "nothing published while Consul is down"
        consul.passing["catalog"] = [entry("catalog-3")]
        await consul.set_down(False)
        await snapshots.until(consul.passing)
    assert "recovered" in caplog.text
    assert caplog.text.count("keeping the last answer") == 3, "each outage logged once"


async def test_one_read_without_blocking() -> None:
    consul = FakeConsul(
        {"catalog": [entry("catalog-1")], "consul": [entry("consul", metrics_port=None)]}
    )
    assert await read_passing(consul.services, consul.health) == consul.passing


# --- the HTTP endpoint and the command line ---------------------------------------------------


async def test_the_endpoint_serves_the_last_published_json() -> None:
    endpoint = HttpSdEndpoint()
    url = await endpoint.start("127.0.0.1", 0)
    try:
        endpoint.body = render(target_groups({"catalog": [entry("catalog-1")]}))
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.json() == json.loads(endpoint.body)
    finally:
        await endpoint.close()


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9187") == ("127.0.0.1", 9187)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9187", ":9187", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", "nowhere"], "meshctl prometheus-sd: error: argument --listen: bad address"),
        (["--connect-timeout", "soon"], "argument --connect-timeout: bad duration 'soon'"),
        (["--watch", "--out"], "argument -o/--out: expected one argument"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_argparse_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["prometheus-sd", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--watch"], "--watch needs --out FILE or --listen HOST:PORT"),
        (["--out", "no/such/dir/targets.json"], "--out no/such/dir/targets.json: no directory"),
        (["--connect-timeout", "0"], "--connect-timeout must be > 0"),
        (["--consul", "http://127.0.0.1:99999"], "--consul: CONSUL_HTTP_ADDR="),
    ],
)
def test_flags_that_cannot_work_exit_2(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prometheus-sd", *flags]) == 2
    assert f"meshctl prometheus-sd: error: {message}" in capsys.readouterr().err


def test_no_consul_agent_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "targets.json"
    agent = f"127.0.0.1:{free_tcp_port()}"  # nothing listens there
    assert main(["prometheus-sd", "--consul", agent, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        f"meshctl prometheus-sd: failed: cannot read the catalog of Consul at http://{agent}" in err
    )
    assert "CONSUL_HTTP_ADDR" in err
    assert not out.exists(), "no file that would say the mesh is empty"
