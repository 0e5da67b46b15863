"""`meshctl load` as a user runs it: a real subprocess against real service processes (and a
real Consul), its JSON report checked against what the servers saw and what was injected.

The servers' own Prometheus counters (grpc_server_handled_total, per status code) are the
independent record: the report's status counts must equal them exactly, across worker
processes, and bad input must leave them at zero. Latency is checked against server-side
fault injection (a known share of calls delayed by a known time, a known share aborted).
"""

from __future__ import annotations

import json
import math
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from foodmesh.orders.v1 import orders_pb2
from mesh.telemetry.rpc_metrics import GO_CODE_NAMES
from scripts.processes import free_tcp_port, wait_until
from tests.integration.conftest import (
    MANY_COURIERS,
    PROJECT_ROOT,
    ServiceProcess,
    Stack,
    count_orders,
)

GET_ITEM = "foodmesh.catalog.v1.CatalogService/GetItem"
PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"
ITEM = '{"item_id": "roma-margherita"}'
DELAY = 0.05


def meshctl(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m meshctl.load ARGS` (= `meshctl load ARGS`), stderr not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "meshctl.load", *args],
        cwd=PROJECT_ROOT,
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def start_catalog(stack: Stack, *args: str) -> tuple[ServiceProcess, int]:
    """A catalog instance with its metrics on a known port: (process, metrics port)."""
    metrics_port = free_tcp_port()
    flags = ("--metrics-port", str(metrics_port), "--drain-delay", "0", *args)
    return stack.start("catalog", *flags), metrics_port


PYTHON_CODE_NAMES = {go: code.name for code, go in GO_CODE_NAMES.items()}


def served(metrics_port: int, method: str = GET_ITEM) -> dict[str, int]:
    """The server's grpc_server_handled_total for `method`, by status code (Python's name,
    as the report's)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    grpc_service, grpc_method = method.split("/")
    return {
        PYTHON_CODE_NAMES[sample.labels["grpc_code"]]: int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels["grpc_service"] == grpc_service
        and sample.labels["grpc_method"] == grpc_method
    }


def percentile(report: dict[str, Any], q: float) -> float:
    """Seconds at percentile q of the report."""
    (ms,) = [p["latency_ms"] for p in report["latency_distribution"] if p["percentile"] == q]
    return float(ms) / 1000


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_report_matches_injected_faults_and_the_servers_counts(stack: Stack) -> None:
    catalog, metrics = start_catalog(
        stack,
        *("--fault-delay", str(DELAY), "--fault-delay-percent", "30"),
        *("--fault-abort", "UNAVAILABLE", "--fault-abort-percent", "20"),
    )
    stack.wait_passing("catalog", 1)
    n = 400
    report = report_of(
        meshctl(stack, catalog.address, GET_ITEM, "-d", ITEM, "-n", str(n), "-c", "16",
                "--workers", "2", "-O", "json")
    )  # fmt: skip
    statuses = report["status_counts"]
    assert report["count"] == n
    assert sum(statuses.values()) == n
    assert set(statuses) == {"OK", "UNAVAILABLE"}
    assert statuses == served(metrics)  # exactly what the server saw, over both workers
    assert within_binomial(statuses["UNAVAILABLE"], n, 0.20), statuses
    (message,) = report["error_counts"]
    assert message.startswith("UNAVAILABLE: injected fault")
    assert report["error_counts"][message] == statuses["UNAVAILABLE"]
    # 30% of calls take 50 ms more (aborted ones too: the delay comes first), the rest ~1 ms.
    assert percentile(report, 50) < DELAY / 2
    assert percentile(report, 90) >= DELAY * 0.999  # the histogram keeps 0.1%
    assert report["slowest_ms"] >= DELAY * 1000 * 0.999
    assert report["workers"] == 2 and report["concurrency"] == 16


def test_rate_mode_keeps_its_schedule(stack: Stack) -> None:
    catalog, metrics = start_catalog(stack)
    stack.wait_passing("catalog", 1)
    result = meshctl(
        stack, catalog.address, GET_ITEM, "-d", ITEM, "--rate", "100", "-z", "2s", "-c", "8",
        "-O", "json",
    )  # fmt: skip
    report = report_of(result)
    assert report["count"] == 200  # slots at 0, 10, ..., 1990 ms
    assert report["status_counts"] == {"OK": 200} == served(metrics)
    assert 1.99 <= report["total_s"] < 2.5
    assert 90 <= report["rps"] <= 101
    assert report["rate_per_s"] == 100
    assert report["missed"] == 0 and 0 <= report["max_lag_ms"] < 100
    assert result.stderr == ""


def test_rate_mode_counts_latency_from_the_scheduled_start(stack: Stack) -> None:
    """Every call takes 50 ms and at most 2 are in flight: 40 calls/s at best. At 200/s due,
    calls queue, and their latency counts the wait; a closed loop reports ~50 ms."""
    catalog, _ = start_catalog(stack, "--fault-delay", str(DELAY), "--fault-delay-percent", "100")
    stack.wait_passing("catalog", 1)
    common = (catalog.address, GET_ITEM, "-d", ITEM, "-c", "2", "-O", "json")
    open_model = report_of(meshctl(stack, *common, "--rate", "200", "-n", "80"))
    closed_model = report_of(meshctl(stack, *common, "-n", "20"))
    assert open_model["count"] == 80
    assert open_model["fastest_ms"] >= DELAY * 1000 * 0.999
    # Call j is due at j/200 s but starts at about (j // 2) * 50 ms: the median waits ~0.8 s.
    assert percentile(open_model, 50) > 8 * DELAY
    assert percentile(open_model, 99) > 1.2
    assert open_model["max_lag_ms"] > 1000  # the report says the schedule slipped
    assert open_model["total_s"] >= 80 / 40 * 0.95
    assert percentile(closed_model, 99) < 2 * DELAY


def test_bad_input_exits_2_and_sends_no_call(stack: Stack) -> None:
    catalog, metrics = start_catalog(stack)
    stack.wait_passing("catalog", 1)
    address = catalog.address
    cases = [
        ((address, "foodmesh.catalog.v1.CatalogService/GetThing", "-d", ITEM), "GetThing"),
        ((address, "foodmesh.nope.v1.Nope/GetItem", "-d", ITEM), "foodmesh.nope.v1.Nope"),
        ((address, GET_ITEM, "-d", '{"itemid": "x"}'), "itemid"),
        ((address, GET_ITEM, "-d", '{"item_id": 5}'), "item_id"),
        ((address, GET_ITEM, "-d", '{"item_id": "{{nope}}"}'), "{{nope}}"),
        ((address, GET_ITEM, "-d", '{"item_id": '), "not valid JSON"),
        ((address, GET_ITEM, "--source", "stubs", "-d", '{"x": 1}'), '"x"'),
        (("catalgo", GET_ITEM, "-d", ITEM, "--connect-timeout", "0.5"), "'catalgo'"),
        ((address, GET_ITEM, "-d", ITEM, "-z", "ten"), "--duration"),
    ]
    for args, named in cases:
        result = meshctl(stack, *args, "--workers", "2", "-c", "4", "-n", "10")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "meshctl load: error:" in result.stderr, result.stderr
        assert named in result.stderr, (named, result.stderr)
        assert result.stdout == ""
        if named == "'catalgo'":
            assert stack.agent.http_addr in result.stderr  # and the agent it asked
    assert served(metrics) == {}


def test_consul_target_spreads_calls_over_the_instances(stack: Stack) -> None:
    instances = [start_catalog(stack) for _ in range(2)]
    stack.wait_passing("catalog", 2)
    report = report_of(meshctl(stack, "catalog", GET_ITEM, "-d", ITEM, "-n", "300", "-c", "8",
                               "-O", "json"))  # fmt: skip
    assert report["status_counts"] == {"OK": 300}
    per_instance = [served(metrics).get("OK", 0) for _, metrics in instances]
    assert sum(per_instance) == 300
    assert min(per_instance) > 0, per_instance


def test_placeholders_make_every_order_new_across_workers(stack: Stack) -> None:
    stack.start_platform(delivery=MANY_COURIERS)  # 60 orders: more than the default couriers
    body = json.dumps(
        {
            "customer_id": stack.customer(),
            "idempotency_key": "{{uuid}}",
            "lines": [{"item_id": "{{choice roma-margherita,roma-carbonara}}", "quantity": 1}],
            "payment_method": "pm_card_visa",
            "delivery_address": "{{worker}} Load Street",
        }
    )
    report = report_of(meshctl(stack, "orders", PLACE_ORDER, "-d", body, "-n", "60", "-c", "4",
                               "--workers", "2", "-O", "json"))  # fmt: skip
    assert report["status_counts"] == {"OK": 60}
    assert count_orders(stack) == 60  # no idempotency key repeated
    with sqlite3.connect(stack.data_dir / "orders.db") as db:
        rows = db.execute("SELECT data FROM order_views").fetchall()
    placed = [orders_pb2.Order.FromString(data) for (data,) in rows]
    assert {o.status for o in placed} == {orders_pb2.ORDER_STATUS_CONFIRMED}
    assert {o.delivery_address for o in placed} == {"0 Load Street", "1 Load Street"}, (
        "each worker fills in its own number"
    )


def test_plot_and_csv(stack: Stack, tmp_path: Path) -> None:
    catalog, _ = start_catalog(stack)
    stack.wait_passing("catalog", 1)
    png, csv = tmp_path / "latency.png", tmp_path / "report.csv"
    result = meshctl(stack, catalog.address, GET_ITEM, "-d", ITEM, "-n", "200", "-c", "4",
                     "--plot", str(png), "-O", "csv", "-o", str(csv))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 10_000
    rows = dict(line.split(",", 1) for line in csv.read_text().splitlines())
    assert rows["count"] == "200"
    assert rows["status:OK"] == "200"


def test_progress_only_on_a_terminal(stack: Stack) -> None:
    catalog, _ = start_catalog(stack, "--fault-delay", "0.01", "--fault-delay-percent", "100")
    stack.wait_passing("catalog", 1)
    args = [sys.executable, "-m", "meshctl.load", catalog.address, GET_ITEM, "-d", ITEM]
    args += ["-z", "2s", "-c", "4", "--workers", "2", "-O", "json"]
    piped = subprocess.run(args, cwd=PROJECT_ROOT, env=stack.env(), capture_output=True)
    assert piped.returncode == 0
    assert piped.stderr == b""

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            args, cwd=PROJECT_ROOT, env=stack.env(), stdout=subprocess.PIPE, stderr=terminal
        )
        os.close(terminal)
        stdout, _ = proc.communicate(timeout=60)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert proc.returncode == 0
    assert json.loads(stdout)["count"] > 0
    lines = shown.decode().split("\r")
    medians = [float(m) for m in re.findall(r"p50 (\d+\.\d+) ms", shown.decode())]
    assert any(" calls " in line and "p99" in line for line in lines), shown
    # the workers' histograms are merged: the median is that of calls all delayed 10 ms
    assert medians and all(m >= 10 * 0.999 for m in medians), shown
    assert shown.endswith(b"\r\x1b[K")  # the line is cleared at the end


def test_ctrl_c_prints_the_report_so_far_and_exits_130(stack: Stack) -> None:
    catalog, metrics = start_catalog(stack)
    stack.wait_passing("catalog", 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl.load", catalog.address, GET_ITEM, "-d", ITEM,
         "-z", "60s", "-c", "4", "--workers", "2", "-O", "json"],
        cwd=PROJECT_ROOT, env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: served(metrics).get("OK", 0) > 100, timeout=30, message="no load arrived"
        )
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["count"] > 100
    assert report["total_s"] < 60
    assert report["count"] <= served(metrics)["OK"]  # calls cut short were not recorded
