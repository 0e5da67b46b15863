"""`python -m mesh.health_probe ADDR`: is the gRPC server at ADDR serving? For a container's
HEALTHCHECK, a Kubernetes exec probe, or a shell script.

It asks grpc.health.v1's Check (every MeshServer serves it, with "" for the whole server and
each service's full name) and exits with grpc-health-probe's codes, which probes and
operators already know (grpc-ecosystem/grpc-health-probe):

    0  SERVING
    1  bad arguments
    2  no connection within --connect-timeout
    3  the Check call failed (its code and message are printed)
    4  the answer was not SERVING (NOT_SERVING, SERVICE_UNKNOWN, ...)

    python -m mesh.health_probe 127.0.0.1:50051
    python -m mesh.health_probe 127.0.0.1:50051 --service foodmesh.orders.v1.OrderService

Written here rather than shipping grpc-health-probe's Go binary: the images already have
Python and grpcio, and a second binary per image is one more thing to build and patch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

OK, BAD_ARGUMENTS, NO_CONNECTION, RPC_FAILED, UNHEALTHY = 0, 1, 2, 3, 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(BAD_ARGUMENTS)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m mesh.health_probe",
        description="Exit 0 if the gRPC server at ADDR answers SERVING to grpc.health.v1.",
    )
    parser.add_argument("address", metavar="ADDR", help="host:port of the server")
    parser.add_argument(
        "--service",
        default="",
        help="the service to ask about (default: the whole server, '')",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="time to connect (default: %(default)s)",
    )
    parser.add_argument(
        "--rpc-timeout",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="time for the Check call (default: %(default)s)",
    )
    return parser.parse_args(argv)


def probe(address: str, service: str, connect_timeout: float, rpc_timeout: float) -> int:
    """The exit code for the health of `service` at `address` (the module docstring's)."""
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            print(f"{address}: no connection within {connect_timeout:g}s", file=sys.stderr)
            return NO_CONNECTION
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=rpc_timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            print(f"{address}: health check failed: {code.name}: {details}", file=sys.stderr)
            return RPC_FAILED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    what = repr(service) if service else "the server"
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{address}: {what} is {status}", file=sys.stderr)
        return UNHEALTHY
    print(f"{address}: {what} is {status}")
    return OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return probe(args.address, args.service, args.connect_timeout, args.rpc_timeout)


if __name__ == "__main__":
    sys.exit(main())
