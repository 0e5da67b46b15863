"""Child processes and deadline polling, shared by the tests and the dev stack.

Why: tests start real Consul agents and service processes. Each child runs in its own process
group, so stopping it stops everything it started, and on Linux it is told to die with its
parent, so a crashed or interrupted test run leaves nothing behind. Waiting for a child to be
ready polls a condition against a deadline instead of sleeping a fixed time and hoping.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")

_ON_LINUX = sys.platform.startswith("linux")


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=2000)
_LOWEST_PICKED = 10_000


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago, for a process about to bind it.

    It is drawn below the kernel's ephemeral range when there is room: the local ends of
    outgoing connections take their ports from that range, so a port chosen there (as the
    kernel's choice for port 0 is) can be taken by some connection before the process it was
    chosen for binds it, which a suite that opens thousands of connections does see. Ports
    handed out recently in this process are not handed out again.
    """
    first_ephemeral = _ephemeral_range()[0]
    if first_ephemeral - _LOWEST_PICKED > 1000:
        for _ in range(100):
            port = random.randrange(_LOWEST_PICKED, first_ephemeral)
            if port in _HANDED_OUT:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _HANDED_OUT.append(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
    _HANDED_OUT.append(chosen)
    return chosen


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; else IANA's)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


_LAUNCHER = Path(__file__).with_name("die_with_parent.py")


def _die_with_parent(args: list[str]) -> list[str]:
    """On Linux, `args` run through the launcher that asks for SIGTERM when we die."""
    if not _ON_LINUX:
        return args
    return [sys.executable, str(_LAUNCHER), str(os.getpid()), *args]


def spawn(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session, stdout and stderr appended to ``log_path``.

    ``env`` replaces the environment, as in ``subprocess.Popen`` (None inherits ours);
    ``log_path`` None inherits our stdout and stderr. On Linux the child gets SIGTERM when
    the *thread* that spawned it exits (prctl's rule), so spawn from a long-lived thread.
    """
    log = open(Path(log_path), "ab") if log_path is not None else None
    try:
        return subprocess.Popen(
            _die_with_parent([os.fspath(arg) for arg in args]),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,
        )
    finally:
        if log is not None:
            log.close()


class Running:
    """`with` support for a helper that runs a real server (an agent, a broker, a database):
    started on entering, closed on leaving, whatever way the block ends. `close()` is
    `stop()` unless the helper has more to clean up."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def stop_process(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Send ``sig`` to the child's process group, SIGKILL it after ``timeout``; exit code."""
    if proc.poll() is None:
        _signal_group(proc, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    return proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # spawn() made the child a group leader
    except ProcessLookupError:
        pass  # already gone
    except PermissionError:
        proc.send_signal(sig)  # not a group we lead (not started by spawn)


def log_tail(path: str | os.PathLike[str], lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or why it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions of the ``ignore`` types count as "not yet" (e.g. ``ConnectionError`` while a
    server starts). Raises ``TimeoutError(message)`` after ``timeout`` seconds, chained to
    the last ignored exception if there was one.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except ignore as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(message) from last_error
        time.sleep(min(interval, remaining))


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """``wait_until`` for event loops: ``predicate`` may be sync or async."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except ignore as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(message) from last_error
        await asyncio.sleep(min(interval, remaining))
