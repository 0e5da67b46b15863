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
    """Fail the test that leaves a child process of the test run alive. Processes that were
    running when it began belong to a fixture shared by several tests (a module's stack),
    which stops them when its last test is done, and is checked by the test after it."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    before = set(_live_children(os.getpid()))
    yield
    leftovers = [child for child in _live_children(os.getpid()) if child not in before]
    assert not leftovers, f"processes left running: {leftovers}"
