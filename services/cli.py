"""The command line every service shares, so that `python -m services.<name>` reads the same
flags and writes the same log lines whichever service it starts.

Port 0 is the default because several instances of one service usually run on one machine:
each takes a free port and registers the port it bound. Logs go to stderr, one line per event
(a traceback is folded into its event's line), so that `grep` and log shippers see whole events.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mesh.server import ServerConfig
from services.datadir import default_data_dir

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s {service} %(name)s: %(message)s"


def parse_args(service_name: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a service's flags (sys.argv[1:] when argv is None).

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
        type=_port_number,
        default=0,
        help="port to listen on; 0 takes any free port (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="directory of the service's SQLite file, shared by its instances "
        "(default: %(default)s)",
    )
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
        type=_positive_seconds,
        default=2.0,
        help="seconds between Consul's gRPC health checks (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-delay",
        type=_non_negative_seconds,
        default=1.0,
        help="seconds to keep serving after deregistering on SIGTERM, while clients "
        "drop this instance (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=_non_negative_seconds,
        default=10.0,
        help="seconds in-flight calls get to finish on shutdown (default: %(default)s)",
    )
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
    )


def project_version() -> str:
    """The installed project's version (registered in Consul's service meta)."""
    try:
        return importlib.metadata.version("foodmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def configure_logging(level: str | int, service_name: str) -> None:
    """Send every log record to stderr as one line: UTC time, level, service, logger, message.

    Replaces handlers configured earlier, so calling it twice does not double the lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT.format(service=service_name)))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class OneLineFormatter(logging.Formatter):
    """A formatter with ISO-8601 UTC times that escapes line breaks, so one event is one line."""

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def _port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port
