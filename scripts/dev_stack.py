"""The whole platform on one machine, in one command: a Consul dev agent, two catalog and two
orders instances, wired together through the mesh, and somewhere for their traces to go.

    python scripts/dev_stack.py            # runs until Ctrl-C (or SIGTERM)
    python scripts/dev_stack.py --once     # start, place a demo order, stop (smoke test, CI)

Why: trying the mesh by hand takes five terminals and the right environment in each. This
starts everything, waits until Consul sees every instance passing its health check, prints
where the Consul UI is and grpcurl commands to paste, and proves the stack works by placing
one order through the mesh (our process -> Consul -> orders -> Consul -> catalog).

Traces: the services export OTLP/gRPC wherever OTEL_EXPORTER_OTLP_ENDPOINT points (a Jaeger,
a collector), passed through unchanged. When it is not set, the stack starts the local receiver
(mesh/telemetry/receiver.py, on 4317 when free) with its store in the data dir, points the
services at it, and prints the command that draws the most recent traces as waterfalls. The
demo order is traced too, from our process on, and its trace id printed. Each instance's
Prometheus endpoint (Consul meta ``metrics_port``) is printed with the instances.

It stops in the order that loses nothing: the services first, with SIGTERM, so that each goes
NOT_SERVING and deregisters itself (orders before catalog, which it calls) and flushes its last
spans; then a check that Consul lists none of our instances any more; then the trace receiver,
which those last spans had to reach; then Consul. Every child runs in its own process
group (scripts/processes.spawn), so Ctrl-C in the terminal reaches only this script, which
does the stopping; and every child dies with this script if it is killed, so nothing is left
running whatever happens.

Exit code 0 after an orderly stop, also when an instance was killed on purpose while the stack
ran (it is reported at once, and Consul's entry for it is removed at the end); 1 when startup
fails (everything started is stopped, and the tail of the failing process's log is printed),
or when a running service did not stop cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, only scripts/ is on sys.path; the project and its generated stubs are not.
IMPORT_ROOTS = (PROJECT_ROOT, PROJECT_ROOT / "protos")
for _root in reversed(IMPORT_ROOTS):
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

import grpc  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402

import mesh  # noqa: E402
from discovery import ConsulResolver, ConsulSettings  # noqa: E402
from foodmesh.orders.v1 import orders_pb2, orders_pb2_grpc  # noqa: E402
from mesh.telemetry.tracing import tracing_to  # noqa: E402
from scripts.consul_agent import HOST, ConsulAgent  # noqa: E402
from scripts.processes import log_tail, spawn, stop_process, wait_until  # noqa: E402

DEFAULT_CONSUL_HTTP_PORT = 8500
DEFAULT_DATA_DIR = PROJECT_ROOT / ".dev" / "data"
DEFAULT_LOG_DIR = PROJECT_ROOT / ".dev" / "logs"
# (Consul service name, instances), in start order; stopped in reverse (callers first).
SERVICES = (("catalog", 2), ("orders", 2))
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

LIST_ITEMS = "foodmesh.catalog.v1.CatalogService/ListItems"
PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"
LIST_ITEMS_EXAMPLE = {"restaurant_id": "trattoria-roma"}
PLACE_ORDER_EXAMPLE = {
    "customer_id": "grpcurl-user",
    "lines": [{"item_id": "roma-margherita", "quantity": 1}],
}
DEMO_CUSTOMER = "dev-stack"
DEMO_LINES = (("roma-margherita", 2), ("roma-carbonara", 1))
DEMO_ORDER_TIMEOUT_S = 15.0
DEMO_SPAN = "dev-stack demo order"

OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
# What tracing_from_env reads before the general variable, and its off switch.
OTLP_TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTEL_DISABLED_ENV = "OTEL_SDK_DISABLED"
DEFAULT_OTLP_PORT = 4317
# The services' batch span processor exports every 0.5 s (the SDK's default is 5 s), so that a
# call shows up in the waterfall about as soon as it is made.
SPAN_BATCH_DELAY_MS = "500"
TRACE_STORE_NAME = "traces.jsonl"
RECEIVER_LOG_NAME = "otlp-receiver"

POLL_INTERVAL_S = 0.2
WATCH_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 30
CONSUL_API_ERRORS = (OSError, http.client.HTTPException, ValueError)


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that it unwinds
    whatever runs (startup included) and no ``except Exception`` swallows it."""


class StartupFailed(Exception):
    """The stack could not be brought up; ``logs`` are the logs that tell why."""

    def __init__(self, message: str, logs: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.logs = tuple(logs)


class SignalGate:
    """Turns the first SIGINT or SIGTERM into StopRequested; later ones only say "wait".

    Once stopping has begun nothing may interrupt it: a half-done stop is what leaves
    registrations and processes behind.
    """

    def __init__(self) -> None:
        self.stopping = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            # os.write, not print: print is not reentrant, and we may be inside one.
            os.write(2, f"dev_stack: {name}: already stopping, please wait\n".encode())
            return
        self.stopping = True
        raise StopRequested(name)


@dataclass
class ServiceProcess:
    """One ``python -m services.<service>`` child and what Consul says about it."""

    name: str
    """``catalog-1``: how the dev stack names it, and its log file's name."""
    service: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    instance_id: str = ""
    address: str = ""
    metrics_port: str = ""
    """Consul meta ``metrics_port``: where its Prometheus endpoint is ("" if it has none)."""
    exit_reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics" if self.metrics_port else ""


@dataclass
class ReceiverProcess:
    """The local OTLP/gRPC receiver child (``python -m mesh.telemetry.receiver``)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    store: Path
    default_port_taken: bool
    """Whether it took another port because something (a Jaeger?) has 4317."""
    endpoint: str = ""
    """``http://127.0.0.1:<port>``, as it printed it once listening."""
    exit_reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


def say(message: str = "") -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(f"dev_stack: {message}", file=sys.stderr, flush=True)


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter to read).

    Symlinks are kept: a virtualenv's ``bin/python`` must not turn into the system's.
    """
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def grpcurl_command(address: str, method: str, request: dict[str, Any]) -> str:
    """A grpcurl command line, quoted so that it can be pasted into a POSIX shell."""
    return shlex.join(["grpcurl", "-plaintext", "-d", json.dumps(request), address, method])


def waterfall_command(store: Path, *extra: str) -> str:
    """The command that draws the most recent traces of ``store``, to paste into a shell."""
    python = shown(Path(sys.executable))
    return shlex.join([python, "-m", "mesh.telemetry.waterfall", "--store", shown(store), *extra])


def child_env(**variables: str) -> dict[str, str]:
    """Our environment plus ``variables``, with the project importable."""
    env = dict(os.environ, **variables)
    paths = [str(root) for root in IMPORT_ROOTS]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def service_env(consul_addr: str, receiver: ReceiverProcess | None) -> dict[str, str]:
    """Our environment, pointed at the stack's agent (and at its trace receiver, if any)."""
    env = child_env(CONSUL_HTTP_ADDR=consul_addr)
    env.pop("CONSUL_HTTP_TOKEN", None)  # a token for another cluster means nothing here
    if receiver is not None:
        env[OTLP_ENDPOINT_ENV] = receiver.endpoint
    env.setdefault("OTEL_BSP_SCHEDULE_DELAY", SPAN_BATCH_DELAY_MS)
    return env


def tracing_off(env: Mapping[str, str]) -> bool:
    return env.get(OTEL_DISABLED_ENV, "").strip().lower() == "true"


def configured_otlp_endpoint(env: Mapping[str, str]) -> str:
    """The OTLP endpoint OpenTelemetry's variables already name (a Jaeger, a collector), or ""."""
    return (env.get(OTLP_TRACES_ENDPOINT_ENV) or env.get(OTLP_ENDPOINT_ENV) or "").strip()


def spawn_receiver(options: argparse.Namespace) -> ReceiverProcess:
    """Start the local OTLP receiver on --otlp-port, else 4317 when free, else any free port."""
    port = options.otlp_port
    default_port_taken = port is None and not port_is_free(DEFAULT_OTLP_PORT)
    if port is None:
        port = 0 if default_port_taken else DEFAULT_OTLP_PORT
    store = options.data_dir / TRACE_STORE_NAME
    log_path = fresh_log(options.log_dir / f"{RECEIVER_LOG_NAME}.log")
    args = [
        *(sys.executable, "-m", "mesh.telemetry.receiver"),
        *("--host", HOST, "--port", str(port), "--store", str(store)),
    ]
    proc = spawn(args, env=child_env(), log_path=log_path, cwd=PROJECT_ROOT)
    return ReceiverProcess(proc, log_path, store, default_port_taken)


def wait_for_receiver(receiver: ReceiverProcess, timeout: float) -> None:
    """Wait until the receiver listens: it prints ``OTEL_EXPORTER_OTLP_ENDPOINT=<endpoint>``
    once its server has started. Sets ``receiver.endpoint``."""
    prefix = f"{OTLP_ENDPOINT_ENV}="

    def printed_endpoint() -> str:
        for line in receiver.log_path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        if receiver.proc.poll() is not None:
            receiver.exit_reported = True
            raise StartupFailed(
                f"the trace receiver exited with code {receiver.proc.returncode} while starting",
                [receiver.log_path],
            )
        return ""

    try:
        receiver.endpoint = wait_until(
            printed_endpoint,
            timeout=timeout,
            interval=POLL_INTERVAL_S / 2,
            message=f"the trace receiver did not listen within {timeout:g}s",
        )
    except TimeoutError as exc:
        raise StartupFailed(str(exc), [receiver.log_path]) from exc


def fresh_log(path: Path) -> Path:
    """Create ``path`` empty, so that each log holds this run only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


class DevStack:
    """A Consul dev agent and the service processes registered with it."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.agent: ConsulAgent | None = None
        self.services: list[ServiceProcess] = []
        self.receiver: ReceiverProcess | None = None
        self.otlp_endpoint = ""
        """Where the services (and the demo order) export traces; "" when tracing is off."""
        self._consul_exit_reported = False

    # -- starting

    def start(self) -> None:
        """Start the trace receiver if needed and Consul, then the services; return once all
        of them pass in Consul."""
        self._start_tracing()  # the receiver comes up while Consul does
        agent = self._start_consul()
        if self.receiver is not None:
            wait_for_receiver(self.receiver, self.options.startup_timeout)
            self.otlp_endpoint = self.receiver.endpoint
        for service, count in SERVICES:
            for number in range(1, count + 1):
                self._start_service(agent, service, f"{service}-{number}")
        self._wait_until_passing(agent)

    def _start_tracing(self) -> None:
        """Pass OpenTelemetry's own endpoint through, or spawn the local receiver."""
        if tracing_off(os.environ):
            return
        self.otlp_endpoint = configured_otlp_endpoint(os.environ)
        if self.otlp_endpoint:
            if self.options.otlp_port is not None:
                warn(f"--otlp-port ignored: exporting to {self.otlp_endpoint} as the env says")
            return
        self.receiver = spawn_receiver(self.options)

    def _start_consul(self) -> ConsulAgent:
        port = self.options.consul_http_port
        if port is None:
            port = DEFAULT_CONSUL_HTTP_PORT if port_is_free(DEFAULT_CONSUL_HTTP_PORT) else None
        log_path = fresh_log(self.options.log_dir / "consul.log")
        try:
            self.agent = ConsulAgent(log_path=log_path, http_port=port)
            self.agent.start()
        except RuntimeError as exc:  # ConsulNotFound, or the agent did not come up
            raise StartupFailed(f"Consul: {exc}") from exc
        return self.agent

    def _start_service(self, agent: ConsulAgent, service: str, name: str) -> None:
        log_path = fresh_log(self.options.log_dir / f"{name}.log")
        args = [
            sys.executable,
            "-m",
            f"services.{service}",
            "--host",
            HOST,
            "--port",
            "0",
            "--data-dir",
            str(self.options.data_dir),
            "--log-level",
            self.options.log_level,
        ]
        env = service_env(agent.http_addr, self.receiver)
        proc = spawn(args, env=env, log_path=log_path, cwd=PROJECT_ROOT)
        self.services.append(ServiceProcess(name, service, proc, log_path))

    def _wait_until_passing(self, agent: ConsulAgent) -> None:
        timeout = self.options.startup_timeout
        try:
            wait_until(
                lambda: self._all_passing(agent),
                timeout=timeout,
                interval=POLL_INTERVAL_S,
                message=f"not all instances passing in Consul after {timeout:g}s",
                ignore=CONSUL_API_ERRORS,
            )
        except TimeoutError as exc:
            pending = [sp for sp in self.services if not sp.instance_id]
            names = ", ".join(sp.name for sp in pending)
            raise StartupFailed(
                f"{names} not passing in Consul after {timeout:g}s", [sp.log_path for sp in pending]
            ) from exc

    def _all_passing(self, agent: ConsulAgent) -> bool:
        """Whether every instance passes its health check; fails fast if a process died."""
        for sp in self.services:
            if sp.proc.poll() is not None:
                sp.exit_reported = True
                raise StartupFailed(
                    f"{sp.name} (pid {sp.pid}) exited with code {sp.proc.returncode} while "
                    "starting",
                    [sp.log_path],
                )
        if not agent.is_running:
            raise StartupFailed(
                "the Consul agent exited while the services started", [agent.log_path]
            )
        by_pid = {str(sp.pid): sp for sp in self.services}
        for service in dict(SERVICES):
            for entry in agent.api(f"/v1/health/service/{service}?passing=1") or []:
                registered = entry["Service"]
                meta = registered.get("Meta") or {}
                instance = by_pid.get(meta.get("pid", ""))
                if instance is not None:
                    instance.instance_id = registered["ID"]
                    instance.address = f"{registered['Address']}:{registered['Port']}"
                    instance.metrics_port = meta.get("metrics_port", "")
        return all(sp.instance_id for sp in self.services)

    # -- using

    def describe(self) -> None:
        """Print where everything is, and commands to try it."""
        agent = self._running_agent()
        say(f"Consul UI: {agent.ui_url}  (agent pid {agent.pid}, log {shown(agent.log_path)})")
        say(f"  export CONSUL_HTTP_ADDR={agent.http_addr}   # for mesh.channel() in your code")
        say("Instances:")
        for sp in self.services:
            say(
                f"  {sp.name:<10} {sp.address:<21} pid {sp.pid:<7} "
                f"id {sp.instance_id}  log {shown(sp.log_path)}"
            )
        say("Metrics (Prometheus):")
        for sp in self.services:
            say(f"  {sp.name:<10} {sp.metrics_url or '(none registered)'}")
        self._describe_traces()
        say("Try:")
        say(f"  {grpcurl_command(self._first('catalog').address, LIST_ITEMS, LIST_ITEMS_EXAMPLE)}")
        say(f"  {grpcurl_command(self._first('orders').address, PLACE_ORDER, PLACE_ORDER_EXAMPLE)}")
        if self.receiver is not None:
            say(f"  {waterfall_command(self.receiver.store)}   # the most recent traces")

    def _describe_traces(self) -> None:
        receiver = self.receiver
        if receiver is None:
            how = f"exporting to {self.otlp_endpoint}" if self.otlp_endpoint else "off"
            say(f"Traces: {how}  (as OTEL_* in the environment say)")
            return
        say(
            f"Traces: local OTLP receiver at {receiver.endpoint}  (pid {receiver.pid}, "
            f"store {shown(receiver.store)}, log {shown(receiver.log_path)})"
        )
        if receiver.default_port_taken:
            say(
                f"  port {DEFAULT_OTLP_PORT} is taken; if a Jaeger listens there, run with "
                f"{OTLP_ENDPOINT_ENV}=http://localhost:{DEFAULT_OTLP_PORT} to export to it"
            )

    def place_demo_order(self) -> tuple[orders_pb2.Order, str]:
        """Place one order through the mesh: orders found in Consul, catalog behind it.
        Returns the order and its trace id ("" when tracing is off)."""
        consul_addr = self._running_agent().http_addr
        try:
            return asyncio.run(self._place_order(consul_addr, self.otlp_endpoint))
        except grpc.aio.AioRpcError as exc:
            raise StartupFailed(
                f"demo order failed: {exc.code().name}: {exc.details()}",
                [sp.log_path for sp in self.services if sp.service == "orders"],
            ) from exc

    @staticmethod
    async def _place_order(consul_addr: str, otlp_endpoint: str) -> tuple[orders_pb2.Order, str]:
        tracing = None
        if otlp_endpoint:
            tracing = tracing_to(otlp_endpoint, Resource.create({"service.name": "dev-stack"}))
        resolver = ConsulResolver(ConsulSettings.parse(consul_addr))
        channel = mesh.channel("orders", resolver=resolver, tracing=tracing)
        try:
            request = orders_pb2.PlaceOrderRequest(
                customer_id=DEMO_CUSTOMER,
                lines=[orders_pb2.OrderLine(item_id=i, quantity=q) for i, q in DEMO_LINES],
                idempotency_key=f"dev-stack-{uuid.uuid4().hex}",
            )
            stub = orders_pb2_grpc.OrderServiceStub(channel)
            # One root span over the call, so that the whole order is one trace we can name.
            root = (
                tracing.tracer.start_as_current_span(DEMO_SPAN)
                if tracing is not None
                else contextlib.nullcontext()
            )
            with root as span:
                order: orders_pb2.Order = await stub.PlaceOrder(
                    request, timeout=DEMO_ORDER_TIMEOUT_S
                )
            trace_id = (
                "" if span is None else trace.format_trace_id(span.get_span_context().trace_id)
            )
            return order, trace_id
        finally:
            await channel.close()
            await resolver.close()
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # flushes; the exporter blocks

    def watch(self) -> None:
        """Run until a signal arrives, reporting any child that dies meanwhile."""
        while True:
            self.report_exits()
            time.sleep(WATCH_INTERVAL_S)

    def report_exits(self) -> None:
        for sp in self.services:
            if not sp.exit_reported and sp.proc.poll() is not None:
                sp.exit_reported = True
                warn(
                    f"{sp.name} (pid {sp.pid}, {sp.address or 'not yet passing'}) exited with code "
                    f"{sp.proc.returncode}; last lines of {shown(sp.log_path)}:\n"
                    f"{log_tail(sp.log_path, 10)}"
                )
        receiver = self.receiver
        if receiver is not None and not receiver.exit_reported and receiver.proc.poll() is not None:
            receiver.exit_reported = True
            warn(
                f"the trace receiver (pid {receiver.pid}) exited with code "
                f"{receiver.proc.returncode}; see {shown(receiver.log_path)}"
            )
        agent = self.agent
        if agent is not None and not agent.is_running and not self._consul_exit_reported:
            self._consul_exit_reported = True
            warn(f"the Consul agent exited; see {shown(agent.log_path)}")

    def _running_agent(self) -> ConsulAgent:
        if self.agent is None:
            raise RuntimeError("the dev stack is not started")
        return self.agent

    def _first(self, service: str) -> ServiceProcess:
        return next(sp for sp in self.services if sp.service == service)

    # -- stopping

    def stop(self) -> bool:
        """Stop services (callers first), check Consul forgot them, stop the trace receiver
        (after the services' last spans), stop Consul; clean?"""
        clean = True
        for service, _ in reversed(SERVICES):
            clean &= self._stop_all([sp for sp in self.services if sp.service == service])
        clean &= self._check_deregistered()
        clean &= self._stop_receiver()
        if self.agent is not None:
            self.agent.stop()
            say("Consul stopped")
        return clean

    def _stop_all(self, group: list[ServiceProcess]) -> bool:
        """SIGTERM every running process of ``group`` at once; whether each exited 0."""
        running = [sp for sp in group if sp.proc.poll() is None]
        for sp in group:
            if sp not in running and not sp.exit_reported:
                sp.exit_reported = True
                warn(
                    f"{sp.name} had exited with code {sp.proc.returncode}; see {shown(sp.log_path)}"
                )
        if running:
            with ThreadPoolExecutor(max_workers=len(running)) as pool:
                codes = list(
                    pool.map(lambda sp: stop_process(sp.proc, timeout=STOP_TIMEOUT_S), running)
                )
            for sp, code in zip(running, codes, strict=True):
                if code != 0:
                    warn(f"{sp.name} exited with code {code} on SIGTERM; see {shown(sp.log_path)}")
            say(f"stopped {', '.join(sp.name for sp in running)}")
        return all(sp.proc.returncode == 0 for sp in running)

    def _stop_receiver(self) -> bool:
        """SIGTERM the trace receiver; False if it was running and did not exit 0."""
        receiver = self.receiver
        if receiver is None:
            return True
        if receiver.proc.poll() is not None:
            if not receiver.exit_reported:
                receiver.exit_reported = True
                warn(
                    f"the trace receiver had exited with code {receiver.proc.returncode}; "
                    f"see {shown(receiver.log_path)}"
                )
            return True
        code = stop_process(receiver.proc, timeout=STOP_TIMEOUT_S)
        if code != 0:
            warn(f"the trace receiver exited with code {code}; see {shown(receiver.log_path)}")
        say("stopped the trace receiver")
        return code == 0

    def _check_deregistered(self) -> bool:
        """Removes any instance of ours Consul still lists; False if one that stopped cleanly
        (and so should have deregistered itself) is among them."""
        agent = self.agent
        if agent is None or not self.services:
            return True
        if not agent.is_running:
            warn("cannot check that our instances are deregistered: Consul is not running")
            return False
        try:
            registered: dict[str, Any] = agent.api("/v1/agent/services") or {}
        except CONSUL_API_ERRORS as exc:
            warn(f"cannot list Consul's services: {exc}")
            return False
        by_pid = {str(sp.pid): sp for sp in self.services}
        ours = {
            instance_id: by_pid[pid]
            for instance_id, entry in registered.items()
            if (pid := (entry.get("Meta") or {}).get("pid")) in by_pid
        }
        for instance_id, sp in ours.items():
            warn(f"Consul still lists {instance_id} of {sp.name}; deregistering it")
            agent.api(f"/v1/agent/service/deregister/{instance_id}", method="PUT")
        if not ours:
            say("Consul lists none of our instances")
        return all(sp.proc.returncode != 0 for sp in ours.values())


def port_number(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {port}")
    return port


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/dev_stack.py",
        description="Run a Consul dev agent with two catalog and two orders instances, "
        "place a demo order through the mesh, and stop everything on Ctrl-C.",
    )
    parser.add_argument(
        "--consul-http-port",
        type=port_number,
        default=None,
        metavar="N",
        help=f"Consul's HTTP port (default: {DEFAULT_CONSUL_HTTP_PORT} when free, "
        "else any free port)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"the services' SQLite files and the local trace receiver's {TRACE_STORE_NAME} "
        "(default: .dev/data in the project)",
    )
    parser.add_argument(
        "--otlp-port",
        type=port_number,
        default=None,
        metavar="N",
        help=f"port of the local OTLP/gRPC trace receiver, started when {OTLP_ENDPOINT_ENV} "
        f"is not set (default: {DEFAULT_OTLP_PORT} when free, else any free port)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=DEFAULT_LOG_DIR,
        help="one <name>.log per process, emptied on start (default: .dev/logs in the project)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="the services' log level (default: %(default)s)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long every instance may take to pass in Consul (default: %(default)g)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="start, place the demo order, then stop and exit (smoke tests, CI)",
    )
    options = parser.parse_args(argv)
    options.data_dir = options.data_dir.resolve()
    options.log_dir = options.log_dir.resolve()
    return options


def show_order(order: orders_pb2.Order, trace_id: str, receiver: ReceiverProcess | None) -> None:
    lines = ", ".join(f"{line.quantity} x {line.item_id}" for line in order.lines)
    total = f"{order.total_cents // 100}.{order.total_cents % 100:02d} {order.currency}"
    say(f"Demo order through the mesh: order {order.order_id} for {order.customer_id}: {lines}")
    say(f"  total {total} (total_cents {order.total_cents})")
    if trace_id:
        say(f"  trace {trace_id}")
    if trace_id and receiver is not None:
        say(f"  {waterfall_command(receiver.store, '--trace', trace_id)}")


def run(stack: DevStack, options: argparse.Namespace) -> int:
    """Start, show, order, then wait for a signal (or not, with --once); the exit code."""
    started = time.monotonic()
    try:
        stack.start()
        stack.describe()
        show_order(*stack.place_demo_order(), stack.receiver)
        say(f"(started in {time.monotonic() - started:.1f}s)")
        if options.once:
            say("dev stack ok (--once); stopping")
            return 0
        say("dev stack ready; press Ctrl-C to stop")
        stack.watch()
    except StopRequested as stop:
        say(f"\n{stop}: stopping the dev stack")
    except StartupFailed as exc:
        warn(f"startup failed: {exc}")
        for path in exc.logs:
            warn(f"--- last lines of {shown(path)} ---\n{log_tail(path)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    gate = SignalGate()
    gate.install()
    stack = DevStack(options)
    try:
        code = run(stack, options)
    finally:
        gate.stopping = True
        stopping_since = time.monotonic()
        clean = stack.stop()
    if code == 0 and not clean:
        warn("the dev stack did not stop cleanly (see above)")
        code = 1
    say(f"dev stack stopped in {time.monotonic() - stopping_since:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
