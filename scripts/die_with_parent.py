"""`python die_with_parent.py PARENT_PID COMMAND...`: exec COMMAND so that Linux sends it
SIGTERM when PARENT_PID (the thread that started us) dies.

Why a launcher and not subprocess's preexec_fn: a preexec_fn makes subprocess fork() the
parent, and a parent with gRPC loaded runs gRPC's fork handlers in the child, which can
crash it before exec ("epoll_wait error: Bad file descriptor", grpc/grpc#43055). Without a
preexec_fn, subprocess uses vfork, which runs no fork handlers; this launcher then sets the
parent-death signal itself, which survives exec. Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
