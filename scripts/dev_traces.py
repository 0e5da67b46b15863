"""Where the dev stack's traces go: OpenTelemetry's own endpoint, or a local receiver it starts.

Why: the services export OTLP/gRPC wherever OTEL_EXPORTER_OTLP_ENDPOINT points (a Jaeger, a
collector), and the stack passes that through unchanged. When it is not set there would be
nowhere to look at a trace, so the stack starts the local receiver (mesh/telemetry/receiver.py,
on 4317 when free) with its store in the data dir, points the services at it, and prints the
command that draws the most recent traces as waterfalls. The receiver is stopped only after
the services, whose last spans have to reach it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scripts.consul_agent import HOST
from scripts.dev_console import say, shown, warn
from scripts.dev_processes import (
    POLL_INTERVAL_S,
    PROJECT_ROOT,
    STOP_TIMEOUT_S,
    StartupFailed,
    child_env,
    fresh_log,
    port_is_free,
)
from scripts.processes import spawn, stop_process, wait_until

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


def tracing_off(env: Mapping[str, str]) -> bool:
    return env.get(OTEL_DISABLED_ENV, "").strip().lower() == "true"


def configured_otlp_endpoint(env: Mapping[str, str]) -> str:
    """The OTLP endpoint OpenTelemetry's variables already name (a Jaeger, a collector), or ""."""
    return (env.get(OTLP_TRACES_ENDPOINT_ENV) or env.get(OTLP_ENDPOINT_ENV) or "").strip()


def waterfall_command(store: Path, *extra: str) -> str:
    """The command that draws the most recent traces of ``store``, to paste into a shell."""
    python = shown(Path(sys.executable))
    return shlex.join([python, "-m", "mesh.telemetry.waterfall", "--store", shown(store), *extra])


def spawn_receiver(port: int | None, *, data_dir: Path, log_dir: Path) -> ReceiverProcess:
    """Start the local OTLP receiver on ``port``, else 4317 when free, else any free port; its
    store goes in ``data_dir``, its log in ``log_dir``."""
    default_port_taken = port is None and not port_is_free(DEFAULT_OTLP_PORT)
    if port is None:
        port = 0 if default_port_taken else DEFAULT_OTLP_PORT
    store = data_dir / TRACE_STORE_NAME
    log_path = fresh_log(log_dir / f"{RECEIVER_LOG_NAME}.log")
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


def describe_traces(receiver: ReceiverProcess | None, otlp_endpoint: str) -> None:
    """Print where the traces go (``otlp_endpoint`` is "" when tracing is off)."""
    if receiver is None:
        how = f"exporting to {otlp_endpoint}" if otlp_endpoint else "off"
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


def stop_receiver(receiver: ReceiverProcess) -> bool:
    """SIGTERM the trace receiver; False if it was running and did not exit 0."""
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
