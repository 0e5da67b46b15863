"""What the dev stack prints: progress on stdout, problems on stderr prefixed ``dev_stack:``.

Why one place: the dev stack's modules (dev_stack, dev_traces, dev_demo) talk to one terminal
and should read as one voice. Every line is flushed at once, because a child's output or a
Ctrl-C may come between two of ours, and paths are shown as short as they can be while they
still paste into a shell.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
