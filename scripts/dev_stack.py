"""The whole platform on one machine, in one command: a Consul dev agent, NATS JetStream, the
seven services (users, two catalog, payments, delivery, notifications, order-history, two
orders) wired together through the mesh and the broker, the gateway in front of them (on 8080
when free), and somewhere for their traces to go.

    python scripts/dev_stack.py            # runs until Ctrl-C (or SIGTERM)
    python scripts/dev_stack.py --once     # start, run the demo, stop (smoke test, CI)

Why: trying the mesh by hand takes eight terminals and the right environment in each. This
starts everything, callers after what they call (orders once users, catalog, payments and
delivery pass, so that the sagas it resumes at start find them), waits until Consul sees every
instance passing its health check, and prints where the Consul UI, each instance's Prometheus
endpoint (Consul meta ``metrics_port``) and the traces are. It proves the stack works with the
demo (scripts/dev_demo.py): a user who logs in and places, through the mesh, one order that is
CONFIRMED and one, paid with a declined card, that is REJECTED. Then it prints grpcurl commands
to paste, through the gateway as a client outside the mesh would call, that use what the demo
made (the user's token, the confirmed order's id), and a `meshctl load` command as that user
through the mesh. Delivery runs with short trips (``--trip-seconds``), so
that the confirmed order is DELIVERED while one watches it. Traces go where OpenTelemetry's
variables say, or to a local receiver the stack starts (scripts/dev_traces.py).

It stops in the order that loses nothing: the services first, with SIGTERM, so that each goes
NOT_SERVING and deregisters itself (orders before the services it calls) and flushes its last
spans; then a check that Consul lists none of our instances any more; then NATS (whose store
in the data dir keeps the streams for the next run); then the trace receiver,
which those last spans had to reach; then Consul. Every child runs in its own process
group (scripts/processes.spawn), so Ctrl-C in the terminal reaches only this script, which
does the stopping; and every child dies with this script if it is killed, so nothing is left
running whatever happens.

Exit code 0 after an orderly stop, also when an instance was killed on purpose while the stack
ran (it is reported at once, and Consul's entry for it is removed at the end); 1 when startup
fails (everything started is stopped, and the tail of the failing process's log is printed),
or when a running service did not stop cleanly on SIGTERM.

This module holds the order of things (DevStack) and the command line; what the children have
in common is in scripts/dev_processes.py, what is printed goes through scripts/dev_console.py.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

# Run as a script, only scripts/ is on sys.path: put the project there, so that scripts.* can be
# imported, then the rest of dev_processes.IMPORT_ROOTS (the generated stubs).
_PROJECT = str(Path(__file__).resolve().parent.parent)
if _PROJECT not in sys.path:
    sys.path.insert(0, _PROJECT)

from scripts.dev_processes import (  # noqa: E402
    IMPORT_ROOTS,
    POLL_INTERVAL_S,
    PROJECT_ROOT,
    STOP_TIMEOUT_S,
    ServiceProcess,
    StartupFailed,
    child_env,
    fresh_log,
    port_is_free,
)

for _root in reversed(IMPORT_ROOTS):
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from scripts import dev_demo  # noqa: E402
from scripts.consul_agent import HOST, ConsulAgent  # noqa: E402
from scripts.dev_console import say, shown, warn  # noqa: E402
from scripts.dev_traces import (  # noqa: E402
    DEFAULT_OTLP_PORT,
    OTLP_ENDPOINT_ENV,
    SPAN_BATCH_DELAY_MS,
    TRACE_STORE_NAME,
    ReceiverProcess,
    configured_otlp_endpoint,
    describe_traces,
    spawn_receiver,
    stop_receiver,
    tracing_off,
    wait_for_receiver,
    waterfall_command,
)
from scripts.nats_server import NatsServer  # noqa: E402
from scripts.processes import (  # noqa: E402
    free_tcp_port,
    log_tail,
    spawn,
    stop_process,
    wait_until,
)

DEFAULT_CONSUL_HTTP_PORT = 8500
DEFAULT_DATA_DIR = PROJECT_ROOT / ".dev" / "data"
DEFAULT_LOG_DIR = PROJECT_ROOT / ".dev" / "logs"
DEFAULT_NATS_PORT = 4222
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_GATEWAY_HTTP_PORT = 8081
NATS_URL_ENV = "NATS_URL"
TIERS: tuple[tuple[tuple[str, int], ...], ...] = (
    (
        ("users", 1),
        ("catalog", 2),
        ("payments", 1),
        ("delivery", 1),
        ("notifications", 1),
        ("order-history", 1),
    ),
    (("orders", 2),),
    (("gateway", 1),),
)
"""(Consul service name, instances), tier by tier: a tier starts once every earlier tier
passes in Consul, and a caller is in a later tier than what it calls (orders calls all the
others; the gateway, the edge, routes to all of them). Stopped in reverse, callers first; the
services of a tier together. Consumers of events (notifications, order-history) call nobody
and may start first: their durable consumers keep what was published before they came."""
DEFAULT_TRIP_SECONDS = 20.0
"""Delivery's trip time in the dev stack: the demo order is DELIVERED within the minute."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

LIST_ITEMS = "foodmesh.catalog.v1.CatalogService/ListItems"
LIST_NOTIFICATIONS = "foodmesh.notifications.v1.NotificationService/ListNotifications"
LIST_CUSTOMER_ORDERS = "foodmesh.orderhistory.v1.OrderHistoryService/ListCustomerOrders"
CREATE_USER = "foodmesh.users.v1.UserService/CreateUser"
LOGIN = "foodmesh.users.v1.UserService/Login"
PLACE_ORDER = "foodmesh.orders.v1.OrderService/PlaceOrder"
WATCH_ORDER = "foodmesh.orders.v1.OrderService/WatchOrder"
LIST_ITEMS_EXAMPLE = {"restaurant_id": "trattoria-roma"}
CREATE_USER_EXAMPLE = {
    "email": "you@foodmesh.example",
    "display_name": "You",
    "password": "correct horse battery",
    "idempotency_key": "grpcurl-you",
}
"""A user of one's own. The fixed key makes it paste again safely: the same user comes back."""
LOGIN_EXAMPLE = {"email": dev_demo.DEMO_USER.email, "password": dev_demo.DEMO_USER.password}
ORDER_EXAMPLE = {
    "lines": [{"item_id": "roma-margherita", "quantity": 1}],
    "payment_method": dev_demo.PAYMENT_METHOD,
    "delivery_address": dev_demo.DEMO_ADDRESS,
}
"""A PlaceOrder body without its customer_id: through the gateway, the order is the token's
user's."""
LOAD_EXAMPLE = {
    "idempotency_key": "{{uuid}}",
    "lines": [{"item_id": "{{choice roma-margherita,roma-carbonara}}", "quantity": 1}],
    "payment_method": dev_demo.PAYMENT_METHOD,
    "delivery_address": dev_demo.DEMO_ADDRESS,
}
"""A PlaceOrder body for meshctl load, without its customer_id (the demo user's): a new
idempotency key per call (see meshctl/load). Orders find no free courier once all are on a
trip and are REJECTED then, which is an answer (OK), not an error."""

WATCH_INTERVAL_S = 0.5
CONSUL_API_ERRORS = (OSError, http.client.HTTPException, ValueError)


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that it unwinds
    whatever runs (startup included) and no ``except Exception`` swallows it."""


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


def grpcurl_command(
    address: str, method: str, request: dict[str, Any], token: str | None = None
) -> str:
    """A grpcurl command line, quoted so that it can be pasted into a POSIX shell; with the
    bearer `token` when the method needs one."""
    auth = ["-H", f"authorization: Bearer {token}"] if token else []
    return shlex.join(["grpcurl", "-plaintext", *auth, "-d", json.dumps(request), address, method])


def curl_command(
    method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None
) -> str:
    """A curl command line for the gateway's HTTP/JSON port, pasteable into a POSIX shell."""
    words = ["curl", "-sS", "-X", method]
    if token:
        words += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        words += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    return shlex.join([*words, url])


def load_command(consul_addr: str, customer_id: str) -> str:
    """A `meshctl load` command line against the stack's orders, through the mesh, placing
    orders as the user ``customer_id``."""
    meshctl = shown(Path(sys.executable).with_name("meshctl"))
    words = [f"CONSUL_HTTP_ADDR={consul_addr}", meshctl, "load", "orders", PLACE_ORDER]
    body = json.dumps({"customer_id": customer_id, **LOAD_EXAMPLE})
    return shlex.join([*words, "-d", body, "-c", "8", "-z", "10s"])


def service_env(
    consul_addr: str, receiver: ReceiverProcess | None, nats_url: str
) -> dict[str, str]:
    """Our environment, pointed at the stack's agent and NATS (and at its trace receiver,
    if any)."""
    env = child_env(CONSUL_HTTP_ADDR=consul_addr, NATS_URL=nats_url)
    env.pop("CONSUL_HTTP_TOKEN", None)  # a token for another cluster means nothing here
    if receiver is not None:
        env[OTLP_ENDPOINT_ENV] = receiver.endpoint
    env.setdefault("OTEL_BSP_SCHEDULE_DELAY", SPAN_BATCH_DELAY_MS)
    return env


class DevStack:
    """A Consul dev agent and the service processes registered with it."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.agent: ConsulAgent | None = None
        self.services: list[ServiceProcess] = []
        self.receiver: ReceiverProcess | None = None
        self.nats: NatsServer | None = None
        self.nats_url = ""
        self.gateway_http_port = 0
        """The broker the services use: $NATS_URL, or the one the stack started."""
        self.otlp_endpoint = ""
        """Where the services (and the demo) export traces; "" when tracing is off."""
        self._consul_exit_reported = False
        self._nats_exit_reported = False

    # -- starting

    def start(self) -> None:
        """Start the trace receiver if needed and Consul, then the services tier by tier;
        return once all of them pass in Consul."""
        self._start_tracing()  # the receiver comes up while Consul does
        self._start_nats()
        agent = self._start_consul()
        if self.receiver is not None:
            wait_for_receiver(self.receiver, self.options.startup_timeout)
            self.otlp_endpoint = self.receiver.endpoint
        for tier in TIERS:
            for service, count in tier:
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
        self.receiver = spawn_receiver(
            self.options.otlp_port, data_dir=self.options.data_dir, log_dir=self.options.log_dir
        )

    def _start_nats(self) -> None:
        """Use the broker $NATS_URL names, or start a nats-server with JetStream (on 4222
        when free), its store in the data dir, so that events outlive a restart."""
        configured = os.environ.get(NATS_URL_ENV, "")
        if configured:
            self.nats_url = configured
            return
        port = self.options.nats_port
        if port is None:
            port = DEFAULT_NATS_PORT if port_is_free(DEFAULT_NATS_PORT) else None
        try:
            self.nats = NatsServer(
                port=port,
                store_dir=self.options.data_dir / "nats",
                log_path=fresh_log(self.options.log_dir / "nats.log"),
            )
            self.nats.start()
        except RuntimeError as exc:  # not installed, or it did not come up
            raise StartupFailed(f"NATS: {exc}") from exc
        self.nats_url = self.nats.url

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
            f"services.{service.replace('-', '_')}",  # order-history: services.order_history
            "--host",
            HOST,
            "--port",
            str(self._port_of(service)),
            "--data-dir",
            str(self.options.data_dir),
            "--log-level",
            self.options.log_level,
            *self._service_flags(service),
        ]
        env = service_env(agent.http_addr, self.receiver, self.nats_url)
        proc = spawn(args, env=env, log_path=log_path, cwd=PROJECT_ROOT)
        self.services.append(ServiceProcess(name, service, proc, log_path))

    def _port_of(self, service: str) -> int:
        """0 (any free port) but for the gateway, whose address users type: --gateway-port,
        else 8080 when free."""
        if service != "gateway":
            return 0
        if self.options.gateway_port is not None:
            return int(self.options.gateway_port)
        return DEFAULT_GATEWAY_PORT if port_is_free(DEFAULT_GATEWAY_PORT) else 0

    def _service_flags(self, service: str) -> list[str]:
        """What one service's instances get besides the flags all share."""
        if service == "gateway":
            port = self.options.gateway_http_port
            if port is None:
                free = DEFAULT_GATEWAY_HTTP_PORT
                port = free if port_is_free(free) else free_tcp_port(HOST)
            self.gateway_http_port = int(port)
            return ["--http-port", str(port)]
        if service == "delivery":
            # Enough couriers that a load test's checkouts are confirmed, not out of couriers.
            return ["--trip-seconds", f"{self.options.trip_seconds:g}", "--couriers", "500"]
        return []

    def _wait_until_passing(self, agent: ConsulAgent) -> None:
        """Wait until every instance started so far passes in Consul."""
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
        """Whether every instance started so far passes its health check; fails fast if a
        process died."""
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
        for service in dict.fromkeys(sp.service for sp in self.services):
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
        """Print where everything is."""
        agent = self._running_agent()
        say(f"Consul UI: {agent.ui_url}  (agent pid {agent.pid}, log {shown(agent.log_path)})")
        say(f"  export CONSUL_HTTP_ADDR={agent.http_addr}   # for mesh.channel() in your code")
        if self.nats is not None:
            log = shown(self.nats.log_path)
            say(f"NATS JetStream: {self.nats.url}  (pid {self.nats.pid}, log {log})")
        else:
            say(f"NATS JetStream: {self.nats_url}  (${NATS_URL_ENV})")
        say("Instances:")
        width = max(len(sp.name) for sp in self.services)
        for sp in self.services:
            say(
                f"  {sp.name:<{width}} {sp.address:<21} pid {sp.pid:<7} "
                f"id {sp.instance_id}  log {shown(sp.log_path)}"
            )
        say("Metrics (Prometheus):")
        for sp in self.services:
            say(f"  {sp.name:<{width}} {sp.metrics_url or '(none registered)'}")
        describe_traces(self.receiver, self.otlp_endpoint)

    def run_demo(self) -> dev_demo.Demo:
        """The demo user and its two orders (scripts/dev_demo.py), through this stack's
        Consul, traced where the services' traces go."""
        logs: dict[str, list[Path]] = {}
        for sp in self.services:
            logs.setdefault(sp.service, []).append(sp.log_path)
        return dev_demo.run_demo(self._running_agent().http_addr, self.otlp_endpoint, logs)

    def suggest(self, demo: dev_demo.Demo) -> None:
        """Print commands to try, with what the demo made: its user, its confirmed order."""
        agent = self._running_agent()
        edge = self._first("gateway").address
        token = demo.login.access_token
        watch_order = {"order_id": demo.confirmed.order.order_id}
        trip = f"{self.options.trip_seconds:g}"
        declined = dev_demo.DECLINED_PAYMENT_METHOD
        tries = [
            (shlex.join(["grpcurl", "-plaintext", edge, "list"]), "every service, at the edge"),
            (grpcurl_command(edge, LIST_ITEMS, LIST_ITEMS_EXAMPLE), "the menu (public)"),
            (
                grpcurl_command(edge, CREATE_USER, CREATE_USER_EXAMPLE),
                "a user of your own (pasted again: the same user)",
            ),
            (
                grpcurl_command(edge, LOGIN, LOGIN_EXAMPLE),
                "the demo user's access token (below, it lasts an hour) and user_id",
            ),
            (
                grpcurl_command(edge, PLACE_ORDER, ORDER_EXAMPLE, token),
                f"an order as the token's user: CONFIRMED (with {declined}: REJECTED)",
            ),
            (
                grpcurl_command(edge, WATCH_ORDER, watch_order, token),
                f"the confirmed demo order, until DELIVERED ({trip} s trips)",
            ),
            (
                grpcurl_command(edge, LIST_NOTIFICATIONS, {"user_id": demo.user_id}, token),
                "the demo user's notifications, made from the orders' events",
            ),
            (
                grpcurl_command(edge, LIST_CUSTOMER_ORDERS, {"customer_id": demo.user_id}, token),
                "the demo user's order history, made from orders', delivery's, catalog's events",
            ),
            (load_command(agent.http_addr, demo.user_id), "load test, as the demo user"),
        ]
        web = f"http://{HOST}:{self.gateway_http_port}"
        tries += [
            (curl_command("GET", f"{web}/v1/items?restaurantId=trattoria-roma"), "the menu, JSON"),
            (
                curl_command("POST", f"{web}/v1/orders", ORDER_EXAMPLE, token),
                "an order over HTTP/JSON, as the demo user",
            ),
            (
                curl_command(
                    "GET", f"{web}/v1/orders/{demo.confirmed.order.order_id}", None, token
                ),
                "the confirmed demo order, JSON",
            ),
        ]
        say(f"The edge: the gateway at {edge} (gRPC; a token from Login on all but the menu)")
        say(f"  storefront: {web}/   (open it in a browser: menu, sign-up, order, live status)")
        say("Try:")
        for command, why in tries:
            say(f"  {command}   # {why}")
        if self.receiver is not None:
            say(f"  {waterfall_command(self.receiver.store)}   # the most recent traces")

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
        nats = self.nats
        if nats is not None and not nats.is_running and not self._nats_exit_reported:
            self._nats_exit_reported = True
            warn(f"nats-server exited; see {shown(nats.log_path)}")
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
        """Stop services (callers first, tier by tier), check Consul forgot them, stop the
        trace receiver (after the services' last spans), stop Consul; clean?"""
        clean = True
        for tier in reversed(TIERS):
            names = {service for service, _ in tier}
            clean &= self._stop_all([sp for sp in self.services if sp.service in names])
        clean &= self._check_deregistered()
        if self.nats is not None:
            self.nats.stop()
            say("NATS stopped")
        if self.receiver is not None:
            clean &= stop_receiver(self.receiver)
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


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return seconds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/dev_stack.py",
        description="Run a Consul dev agent, NATS JetStream (unless $NATS_URL names one) and "
        "users, two catalog, payments, delivery, notifications, order-history, two orders "
        "instances and a gateway, run "
        "the demo (a user, a confirmed and a rejected order, their notifications) through the "
        "mesh, and stop everything on Ctrl-C.",
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
        "--nats-port",
        type=port_number,
        default=None,
        metavar="N",
        help=f"port of the NATS server the stack starts when ${NATS_URL_ENV} is not set "
        f"(default: {DEFAULT_NATS_PORT} when free, else any free port)",
    )
    parser.add_argument(
        "--gateway-port",
        type=port_number,
        default=None,
        metavar="N",
        help=f"the gateway's gRPC port (default: {DEFAULT_GATEWAY_PORT} when free, "
        "else any free port)",
    )
    parser.add_argument(
        "--gateway-http-port",
        type=port_number,
        default=None,
        metavar="N",
        help=f"the gateway's HTTP port: HTTP/JSON, gRPC-Web and the storefront (default: "
        f"{DEFAULT_GATEWAY_HTTP_PORT} when free, else any free port)",
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
        "--trip-seconds",
        type=positive_seconds,
        default=DEFAULT_TRIP_SECONDS,
        metavar="SECONDS",
        help="how long a delivery's trip takes, pickup at half (default: %(default)g)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="start, run the demo, then stop and exit (smoke tests, CI)",
    )
    options = parser.parse_args(argv)
    options.data_dir = options.data_dir.resolve()
    options.log_dir = options.log_dir.resolve()
    return options


def run(stack: DevStack, options: argparse.Namespace) -> int:
    """Start, show, run the demo, suggest, then wait for a signal (or not, with --once); the
    exit code."""
    started = time.monotonic()
    try:
        stack.start()
        stack.describe()
        demo = stack.run_demo()
        dev_demo.show_demo(demo, stack.receiver)
        stack.suggest(demo)
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
