"""`meshctl`: the mesh's command line; `meshctl load` is a ghz-like load tester, `meshctl
prometheus-sd` feeds Prometheus the instances Consul knows (meshctl/prometheus_sd/).

    meshctl load orders foodmesh.orders.v1.OrderService/PlaceOrder \\
        -d '{"customer_id": "ada", "idempotency_key": "{{uuid}}",
             "lines": [{"item_id": "roma-margherita", "quantity": 1}]}' -c 8 -z 20s

The flags follow ghz where ghz has one (-d, -c, -n, -z, -t, -m, -O/--format, -o), so that a
ghz user is at home; durations take Go's units ("500ms", "30s", "2m", "1m30s"). Every input is
checked before the first call: the target is reached, the method found, the request rendered
once (meshctl/load/target.py), the output paths are writable; bad input exits 2 with
"meshctl load: error: ..." as argparse does for bad flags, and sends no call. After a run the
exit code is 0 even if calls failed (as ghz; --fail-on-error makes it 1), and 130 after
Ctrl-C, which still prints the report of what was done so far.

While a run goes on, one line on stderr is rewritten each second (calls, rate, errors, p50 and
p99 so far) when stderr is a terminal; nothing is written there otherwise, so that logs and
pipes stay clean.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from mesh import layers
from mesh.discovery.consul_settings import ConsulSettings
from mesh.telemetry.logs import configure_logging
from meshctl.load.errors import BadInput
from meshctl.load.progress import ProgressLine, show_progress
from meshctl.load.report import FORMATS, RunInfo, build_report, plot, render
from meshctl.load.runner import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, DEFAULT_TOTAL, LoadPlan
from meshctl.load.target import SOURCES, CallSpec, Metadata, Target, prepare
from meshctl.load.workers import FinishedRun, InProcessRun, LoadRun, WorkerFailed, WorkerPool
from meshctl.prometheus_sd.publish import ConsulUnreachable, SdCommand, publish

PROG = "meshctl load"
SD_PROG = "meshctl prometheus-sd"
DEFAULT_CONNECT_TIMEOUT = 10.0
WORKER_START_TIMEOUT = 60.0
"""Seconds worker processes get to start and prepare, beyond the connect timeout."""
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
T = TypeVar("T")


def parse_duration(text: str) -> float:
    """Seconds from "500ms", "30s", "2m", "1h", "1m30s" (Go's units) or a bare number of
    seconds; ValueError naming the text otherwise."""
    value = text.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise ValueError(f"bad duration {text!r}: use e.g. 500ms, 30s, 2m, 1m30s")
    return seconds


def parse_metadata(text: str) -> tuple[str, str | bytes]:
    """("key", "value") from "key=value" or "key: value"; keys are lower-cased as HTTP/2
    wants; a "-bin" key takes base64, as grpcurl's; ValueError naming what is wrong."""
    separator = min((i for i in (text.find("="), text.find(":")) if i > 0), default=-1)
    if separator < 0:
        raise ValueError(f"bad metadata {text!r}: use key=value")
    key, value = text[:separator].strip().lower(), text[separator + 1 :].strip()
    if not _METADATA_KEY.fullmatch(key) or key.startswith("grpc-"):
        raise ValueError(
            f"bad metadata key {key!r}: lower-case letters, digits, '-', '_' and '.', "
            "not starting with 'grpc-'"
        )
    if key.endswith("-bin"):
        try:
            return key, base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError(f"metadata {key}: a -bin value must be base64") from None
    return key, value


def read_data(text: str) -> str:
    """The request body: the text itself, or the file after '@' ('@-': standard input)."""
    if not text.startswith("@"):
        return text
    if text == "@-":
        return sys.stdin.read()
    try:
        return Path(text[1:]).read_text()
    except OSError as exc:
        raise BadInput(f"--data {text}: cannot read the file: {exc.strerror}") from None


def _argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser raising ValueError (argparse then names the flag)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="The foodmesh command line.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "layers",
        help="print the layers of the call path and their order (mesh/layers.py)",
        description="Print the client call path's layers and the server's interceptors, "
        "outermost first, as mesh/layers.py defines them.",
    )
    load = commands.add_parser(
        "load",
        prog=PROG,
        help="load-test one RPC of a service (ghz-like)",
        description="Call one RPC of a service (a Consul service name, through the mesh, or "
        "host:port, on a bare channel) under load, and report latency percentiles, status "
        "codes and errors.",
        epilog="Placeholders in --data: {{n}} {{worker}} {{uuid}} {{choice a,b,c}} "
        "{{randint LO HI}} {{now}}. Exit codes: 0 after a run (even with failed calls), "
        "2 on bad input (no call is sent), 130 after Ctrl-C (the report so far is printed).",
    )
    load.add_argument("target", metavar="TARGET", help="Consul service name, or host:port")
    load.add_argument("method", metavar="METHOD", help="pkg.Service/Method (or pkg.Service.Method)")
    load.add_argument(
        "-d",
        "--data",
        default="{}",
        help="request as JSON; @FILE reads a file, @- stdin (default: %(default)s)",
    )
    load.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="calls in flight (default: %(default)s)",
    )
    load.add_argument(
        "-n",
        "--total",
        type=int,
        metavar="N",
        help=f"calls to make (default: {DEFAULT_TOTAL} unless --duration is given)",
    )
    load.add_argument(
        "-z",
        "--duration",
        type=_argument_type(parse_duration),
        metavar="D",
        help="how long to send, e.g. 30s, 2m (with --total: whichever ends first)",
    )
    load.add_argument(
        "-r",
        "--rate",
        type=float,
        metavar="R",
        help="calls started per second, on schedule whether earlier calls have finished or "
        "not (open model; latency counts from the scheduled start); --concurrency caps "
        "the calls in flight",
    )
    load.add_argument(
        "--warmup",
        type=_argument_type(parse_duration),
        default=0.0,
        metavar="D",
        help="load for this long first, not recorded (default: none)",
    )
    load.add_argument(
        "-t",
        "--timeout",
        type=_argument_type(parse_duration),
        default=DEFAULT_TIMEOUT,
        metavar="D",
        help="deadline of each call (default: %(default)gs)",
    )
    load.add_argument(
        "-m",
        "--metadata",
        type=_argument_type(parse_metadata),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata sent with each call; repeatable",
    )
    load.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="K",
        help="worker processes, each with its own event loop and channel (default: 1, in "
        "this process); the calls, concurrency and rate are split among them",
    )
    load.add_argument(
        "--source",
        choices=SOURCES,
        default="reflection",
        help="where the method's messages come from: the server's reflection, or the "
        "installed foodmesh stubs (default: %(default)s)",
    )
    load.add_argument(
        "--consul",
        metavar="ADDR",
        help="Consul agent for a service name (default: $CONSUL_HTTP_ADDR, else 127.0.0.1:8500)",
    )
    load.add_argument(
        "--connect-timeout",
        type=_argument_type(parse_duration),
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="D",
        help="how long to wait for a connection, or a healthy instance in Consul, and for "
        "reflection (default: %(default)gs)",
    )
    load.add_argument(
        "-O",
        "--format",
        choices=FORMATS,
        default="summary",
        help="report format (default: %(default)s)",
    )
    load.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the report here")
    load.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw latency over time and its distribution (needs matplotlib: "
        "pip install 'foodmesh[plot]')",
    )
    load.add_argument(
        "--fail-on-error",
        action="store_true",
        help="exit 1 when any call failed (default: 0 after any complete run)",
    )
    _add_prometheus_sd(commands)
    return parser


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from "host:port" or "[v6]:port" (port 0: any free port)."""
    host, separator, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9187")
    return host, int(port)


def _add_prometheus_sd(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sd = commands.add_parser(
        "prometheus-sd",
        prog=SD_PROG,
        help="Consul's passing instances as Prometheus file_sd / http_sd targets",
        description="Give Prometheus every passing instance that registered a metrics_port "
        "meta in Consul: <address>:<metrics_port>, labelled consul_service, instance (the "
        "Consul service ID), node and version (as deploy/prometheus/prometheus.yml labels "
        "them), in a file_sd_configs file (--out), from an http_sd_configs endpoint "
        "(--listen), or once on standard output.",
        epilog="Exit codes: 0 after one read, or when --watch ends on SIGTERM or Ctrl-C; "
        "1 when Consul cannot be read at the start, or the file cannot be written, or the "
        "address cannot be listened on; 2 on bad flags.",
    )
    sd.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="FILE",
        help="write the targets to FILE (replaced atomically; for file_sd_configs)",
    )
    sd.add_argument(
        "--listen",
        type=_argument_type(parse_listen),
        metavar="HOST:PORT",
        help="serve the targets at http://HOST:PORT/targets (for http_sd_configs); implies --watch",
    )
    sd.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="keep the targets current with Consul blocking queries until SIGTERM or Ctrl-C",
    )
    sd.add_argument(
        "--consul",
        metavar="ADDR",
        help="Consul agent (default: $CONSUL_HTTP_ADDR, else 127.0.0.1:8500)",
    )
    sd.add_argument(
        "--connect-timeout",
        type=_argument_type(parse_duration),
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="D",
        help="how long the first read of Consul may take (default: %(default)gs)",
    )


def _consul_settings(args: argparse.Namespace) -> ConsulSettings:
    """The agent `--consul` names (with $CONSUL_HTTP_TOKEN), else $CONSUL_HTTP_ADDR's;
    BadInput naming the flag or the variable when it is malformed."""
    try:
        if args.consul is None:
            return ConsulSettings.from_env()
        return ConsulSettings.parse(args.consul, os.environ.get("CONSUL_HTTP_TOKEN"))
    except ValueError as exc:
        raise BadInput(str(exc) if args.consul is None else f"--consul: {exc}") from None


def sd_command(args: argparse.Namespace) -> SdCommand:
    """The run `meshctl prometheus-sd`'s parsed flags ask for; BadInput otherwise."""
    consul = _consul_settings(args)
    if not args.connect_timeout > 0:
        raise BadInput(f"--connect-timeout must be > 0, got {args.connect_timeout:g} s")
    if args.watch and args.out is None and args.listen is None:
        raise BadInput("--watch needs --out FILE or --listen HOST:PORT to publish to")
    if args.out is not None and not args.out.parent.resolve().is_dir():
        raise BadInput(f"--out {args.out}: no directory {args.out.parent}")
    return SdCommand(
        consul=consul,
        out=args.out,
        listen=args.listen,
        watch=args.watch or args.listen is not None,
        connect_timeout=args.connect_timeout,
    )


def _prometheus_sd(args: argparse.Namespace) -> int:
    try:
        command = sd_command(args)
    except BadInput as exc:
        print(f"{SD_PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if command.watch:
        configure_logging("INFO", "meshctl")
    try:
        asyncio.run(publish(command, sys.stdout))
    except (ConsulUnreachable, OSError) as exc:
        print(f"{SD_PROG}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass  # Ctrl-C before the watch began: nothing half-done to report
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class LoadCommand:
    """`meshctl load`'s flags, checked."""

    spec: CallSpec
    plan: LoadPlan
    format: str
    output: Path | None
    plot: Path | None
    fail_on_error: bool


def load_command(args: argparse.Namespace) -> LoadCommand:
    """The run the parsed flags ask for; BadInput for what argparse cannot check alone."""
    consul = ConsulSettings()  # an address target asks no agent: its settings go unused
    if ":" not in args.target:
        consul = _consul_settings(args)
    if not args.connect_timeout > 0:
        raise BadInput(f"--connect-timeout must be > 0, got {args.connect_timeout:g} s")
    metadata: Metadata | None = tuple(args.metadata) or None
    spec = CallSpec(
        target=Target.parse(args.target, consul),
        method=args.method,
        data=read_data(args.data),
        source=args.source,
        metadata=metadata,
        connect_timeout=args.connect_timeout,
    )
    plan = LoadPlan(
        concurrency=args.concurrency,
        total=args.total,
        duration=args.duration,
        rate=args.rate,
        warmup=args.warmup,
        timeout=args.timeout,
        workers=args.workers,
    )
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        if path is not None and not path.parent.resolve().is_dir():
            raise BadInput(f"{flag} {path}: no directory {path.parent}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise BadInput("--plot needs matplotlib: pip install 'foodmesh[plot]'")
    return LoadCommand(spec, plan, args.format, args.output, args.plot, args.fail_on_error)


async def execute(command: LoadCommand, progress: TextIO | None) -> tuple[FinishedRun, str, bool]:
    """Prepare (BadInput before any call), run with progress on `progress` (if given), and
    return the outcome, the method's full path and whether Ctrl-C ended the run."""
    spec, plan = command.spec, command.plan
    prepared = await prepare(spec)
    method_path = prepared.method.path
    run: LoadRun
    if plan.workers == 1:
        run = InProcessRun(prepared, plan.shares()[0], spec)
    else:
        spec = dataclasses.replace(spec, reflection_address=prepared.connection.reflection_address)
        await prepared.close()
        pool = WorkerPool(spec, plan.shares(), report_progress=progress is not None)
        try:
            await pool.start(WORKER_START_TIMEOUT + 2 * spec.connect_timeout)
        except BaseException:
            await pool.close()
            raise
        run = pool
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        run.stop()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupt)
    line = ProgressLine(progress) if progress is not None else None
    shower = asyncio.ensure_future(show_progress(run, line)) if line is not None else None
    try:
        outcome = await run.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if shower is not None:
            shower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shower
        if line is not None:
            line.clear()
        await run.close()
    return outcome, method_path, interrupted


def report(command: LoadCommand, outcome: FinishedRun, method_path: str) -> None:
    """Print (or write) the report, and draw the plot if asked."""
    spec, plan = command.spec, command.plan
    info = RunInfo(
        target=spec.target.name,
        method=method_path,
        concurrency=plan.concurrency,
        workers=plan.workers,
        rate=plan.rate,
        elapsed=outcome.phase.elapsed,
        max_lag=outcome.phase.max_lag,
        missed=outcome.phase.missed,
    )
    result = build_report(info, outcome.run)
    text = render(result, command.format)
    if command.output is not None:
        command.output.write_text(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if outcome.phase.missed:
        print(
            f"{PROG}: warning: {outcome.phase.missed} calls due before the end were never started "
            "(the server or --concurrency could not keep up: the tail is longer than reported)",
            file=sys.stderr,
        )
    if command.plot is not None:
        plot(result, outcome.run, command.plot)


def _load(args: argparse.Namespace) -> int:
    command = load_command(args)
    progress = sys.stderr if sys.stderr.isatty() else None
    outcome, method_path, interrupted = asyncio.run(execute(command, progress))
    report(command, outcome, method_path)
    if interrupted:
        return EXIT_INTERRUPTED
    failed = sum(n for code, n in outcome.run.status_counts.items() if code != "OK")
    return 1 if command.fail_on_error and failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "layers":
        print(layers.render())
        return 0
    if args.command == "prometheus-sd":
        return _prometheus_sd(args)
    try:
        return _load(args)
    except BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (WorkerFailed, OSError) as exc:
        print(f"{PROG}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
