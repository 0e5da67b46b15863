"""The command line every service shares, so that `python -m services.<name>` reads the same
flags whichever service it starts (services/runtime.py acts on them).

Port 0 is the default because several instances of one service usually run on one machine:
each takes a free port and registers the port it bound; the metrics port works the same way.
Bad values end the process with exit code 2 and a message naming the flag or policy key.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from mesh.policy import POLICY_ENV, MeshPolicy, PolicyError, load_policy, load_policy_from_env
from mesh.resilience.faults import FaultPolicy
from mesh.server import ServerConfig
from meshkit.storage.database import is_database_url
from services.datadir import database_path, default_data_dir

EVENTS_REPLICAS_ENV = "FOODMESH_EVENTS_REPLICAS"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_storage_flags(
    parser: argparse.ArgumentParser, whose: str = "the service's", *, default_dir: bool = True
) -> None:
    """--data-dir and --database-url: where a service keeps its state, for the service and
    for the commands that work on its database beside it (`default_dir=False`: no default
    directory; the command asks for one of the two)."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir() if default_dir else None,
        help=f"directory of {whose} SQLite file, shared by its instances"
        + (" (default: %(default)s)" if default_dir else ""),
    )
    parser.add_argument(
        "--database-url",
        type=database_url,
        default=os.environ.get("DATABASE_URL") or None,
        metavar="URL",
        help=f"{whose} Postgres database, postgresql://ROLE:PASSWORD@HOST:PORT/DB, "
        "instead of the SQLite file in --data-dir (default: $DATABASE_URL)",
    )


def database_location(args: argparse.Namespace, service: str) -> Path | str:
    """Where `service` keeps its state by the flags of add_storage_flags: `--database-url`
    (Postgres), or else `<--data-dir>/<service>.db` (SQLite)."""
    url: str | None = args.database_url
    return url if url else database_path(args.data_dir, service)


def database_url(text: str) -> str:
    """A --database-url: a Postgres URL."""
    if not is_database_url(text):
        raise argparse.ArgumentTypeError(
            f"must be a postgresql:// URL (the SQLite file lives in --data-dir), got {text!r}"
        )
    return text


ServiceFlags = Callable[[argparse.ArgumentParser], None]
"""Adds a service's own flags (e.g. delivery's --couriers) to the shared ones."""


def parse_args(
    service_name: str, argv: Sequence[str] | None = None, flags: ServiceFlags | None = None
) -> argparse.Namespace:
    """Parse a service's flags (sys.argv[1:] when argv is None), with its own `flags`.

    The namespace has `host`, `port`, `data_dir` (a Path), `log_level` (upper case) and
    `service_name`.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service_name}",
        description=f"Run the {service_name} service.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=0,
        help="port to listen on; 0 takes any free port (default: %(default)s)",
    )
    add_storage_flags(parser)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="lowest level that is logged (default: %(default)s)",
    )
    parser.add_argument(
        "--advertise-host",
        default=None,
        help="address registered in Consul (default: --host, or this machine's address "
        "when --host is a wildcard)",
    )
    parser.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="serve without registering in Consul",
    )
    parser.add_argument(
        "--check-interval",
        type=positive_seconds,
        default=2.0,
        help="seconds between Consul's gRPC health checks (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-delay",
        type=non_negative_seconds,
        default=1.0,
        help="seconds to keep serving after deregistering on SIGTERM, while clients "
        "drop this instance (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=non_negative_seconds,
        default=10.0,
        help="seconds in-flight calls get to finish on shutdown (default: %(default)s)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="log JSON lines instead of text lines (both carry the trace and span ids)",
    )
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        help="port of the Prometheus endpoint (/metrics) on --host; 0 takes any free port; "
        "registered in Consul as meta metrics_port (default: %(default)s)",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="serve no Prometheus endpoint",
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("NATS_URL") or None,
        help="NATS server (JetStream) for the service's events; without it (or $NATS_URL) "
        "a service's events wait in its outbox and it consumes none (default: $NATS_URL)",
    )
    parser.add_argument(
        "--events-replicas",
        type=positive_int,
        default=os.environ.get(EVENTS_REPLICAS_ENV) or None,
        metavar="N",
        help="copies each JetStream stream the service declares keeps: 3 on a cluster of "
        f"three NATS servers (default: ${EVENTS_REPLICAS_ENV}, else the stream's own, 1)",
    )
    parser.add_argument(
        "--events-ack-wait",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds an event delivered to this service may go unacknowledged before "
        "JetStream delivers it again (a consumer that crashed mid-event) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        help=f"TOML file of the mesh policies for the calls this service makes "
        f"(default: ${POLICY_ENV} if set, else built-in defaults)",
    )
    faults = parser.add_argument_group(
        "fault injection", "make this instance slow or failing, to test how callers cope"
    )
    faults.add_argument(
        "--fault-delay",
        type=non_negative_seconds,
        default=0.0,
        metavar="SECONDS",
        help="delay added to a share of the calls",
    )
    faults.add_argument(
        "--fault-delay-percent",
        type=_percent,
        default=0.0,
        metavar="P",
        help="share of the calls delayed, 0..100 (default: %(default)s)",
    )
    faults.add_argument(
        "--fault-abort",
        type=_status_code,
        default=None,
        metavar="CODE",
        help="gRPC status code (e.g. UNAVAILABLE) a share of the calls fail with",
    )
    faults.add_argument(
        "--fault-abort-percent",
        type=_percent,
        default=0.0,
        metavar="P",
        help="share of the calls aborted, 0..100 (default: %(default)s)",
    )
    if flags is not None:
        flags(parser)
    parser.set_defaults(service_name=service_name)
    return parser.parse_args(argv)


def server_config(args: argparse.Namespace, *, version: str) -> ServerConfig:
    """The MeshServer settings the parsed flags ask for."""
    return ServerConfig(
        service_name=args.service_name,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        version=version,
        register=args.register,
        check_interval=args.check_interval,
        drain_delay=args.drain_delay,
        grace_period=args.grace_period,
        fault=FaultPolicy(
            delay_seconds=args.fault_delay,
            delay_percent=args.fault_delay_percent,
            abort_code=args.fault_abort,
            abort_percent=args.fault_abort_percent,
        ),
    )


def mesh_policy(args: argparse.Namespace) -> MeshPolicy:
    """The policy file the flags or FOODMESH_POLICY name (defaults without one); a bad file
    ends the process with exit code 2 and a message naming the key."""
    try:
        return load_policy(args.policy) if args.policy else load_policy_from_env()
    except (OSError, PolicyError) as exc:
        print(f"python -m services.{args.service_name}: policy: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def project_version() -> str:
    """The installed project's version (registered in Consul's service meta)."""
    try:
        return importlib.metadata.version("foodmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def positive_seconds(text: str) -> float:
    """An argparse type: seconds > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0..100, got {text}")
    return value


def _status_code(text: str) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[text.upper()]
    except KeyError:
        names = ", ".join(code.name for code in grpc.StatusCode if code.name != "OK")
        raise argparse.ArgumentTypeError(f"unknown status code {text!r} (one of {names})") from None


def non_negative_seconds(text: str) -> float:
    """An argparse type: seconds >= 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port
