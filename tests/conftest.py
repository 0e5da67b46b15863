"""Suite-wide guard: no test may leave a process behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def _live_children(parent: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            found.append(f"{stat.parent.name}: {cmdline.strip()}")
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the test that leaves a child process of the test run alive."""
    yield
    if not Path("/proc/self/stat").exists():
        return
    leftovers = _live_children(os.getpid())
    assert not leftovers, f"processes left running: {leftovers}"
